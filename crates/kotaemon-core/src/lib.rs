//! Kotaemon core: the turn pipeline of an edge AI agent and its OpenAI-compatible API.
//!
//! Data flows one way: a source (HTTP API, CLI) makes a [`turn::Turn`], the
//! [`pipeline::Pipeline`] of stages turns it into a [`turn::Reply`], a sink renders it.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod api;
pub mod app;
pub mod audit;
pub mod config;
pub mod cost;
pub mod embedding;
pub mod events;
pub mod models;
pub mod mqtt_conn;
pub mod pipeline;
pub mod plugins;
pub mod queue;
pub mod stages;
pub mod tools;
pub mod turn;
pub mod upstream;
pub mod wire;

pub use app::App;
pub use config::Config;
