//! Integration tests of the gateway over real loopback sockets, against the scripted fake
//! upstream. One test binary for the crate (each binary links everything).

mod api;
mod auth;
mod cache;
mod events;
mod faults;
mod harness;
mod local;
mod pool;
mod rules;
mod tls;
