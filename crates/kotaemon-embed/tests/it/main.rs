//! kotaemon-embed integration tests, against the real model files.
//!
//! Models are found through `KOTAEMON_TEST_MINILM_DIR` and
//! `KOTAEMON_TEST_ZH_EMBED_DIR` (defaults under /var/tmp/kotaemon-models);
//! `crates/kotaemon-embed/scripts/install-models.sh` installs both. A missing
//! model fails the tests with that instruction: it never skips them.

mod batch;
mod common;
mod errors;
mod minilm;
mod zh;
