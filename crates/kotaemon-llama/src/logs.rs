//! Routes llama.cpp / ggml logging into `tracing` (never to stderr).
//!
//! llama.cpp logs dozens of lines at its INFO level on every model load. Kotaemon's INFO is for
//! lifecycle events, so levels are shifted down: llama.cpp ERROR → WARN (our own error value
//! carries the failure), WARN and INFO → DEBUG, DEBUG and continuation fragments → TRACE.
//! Events use the target `llama_cpp`, so `RUST_LOG=llama_cpp=debug` shows the load details.

use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

use llama_cpp_sys_2::{
    ggml_log_level, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN,
};

/// Installs the forwarding callback once per process (idempotent).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `forward` is a plain function valid for the whole program and ignores its user
        // data pointer, so a null pointer is fine.
        unsafe {
            llama_cpp_sys_2::llama_log_set(Some(forward), std::ptr::null_mut());
            llama_cpp_sys_2::ggml_log_set(Some(forward), std::ptr::null_mut());
        }
    });
}

unsafe extern "C" fn forward(level: ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    match level {
        GGML_LOG_LEVEL_ERROR => tracing::warn!(target: "llama_cpp", "{text}"),
        GGML_LOG_LEVEL_WARN | GGML_LOG_LEVEL_INFO => tracing::debug!(target: "llama_cpp", "{text}"),
        _ => tracing::trace!(target: "llama_cpp", "{text}"),
    }
}
