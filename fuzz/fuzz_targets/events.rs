//! Fuzz target: a script of inbound WebSocket messages from five kinds of connection against a
//! fresh hub (see `src/harness.rs` for the input format and what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
