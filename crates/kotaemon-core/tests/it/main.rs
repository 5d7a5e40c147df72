//! Integration tests of the gateway over real loopback sockets, against the scripted fake
//! upstream. One test binary for the crate (each binary links everything).

mod act;
mod api;
mod auth;
mod cache;
mod calendar;
mod cost;
mod events;
mod faults;
mod harness;
mod local;
mod mcp;
mod mqtt;
mod pii;
mod plugins;
mod pool;
mod queue;
mod rules;
mod scenario;
mod tls;
