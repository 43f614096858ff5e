//! Validation of any JSON text: a verdict, never a panic; a valid message is trimmed and
//! within the length limit, and never contains an unsafe pattern.
#![no_main]

use chatq::validate::{MAX_CONTENT_CHARS, Validator, reveal};
use libfuzzer_sys::fuzz_target;

/// Built once: compiling the pattern set per input would be most of the work.
static VALIDATOR: std::sync::LazyLock<Validator> = std::sync::LazyLock::new(Validator::new);

fuzz_target!(|data: &[u8]| {
    let validator = &*VALIDATOR;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = reveal(text);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(message) = validator.message(&value) {
            assert_eq!(message.content, message.content.trim());
            assert!(!message.content.is_empty());
            assert!(message.content.chars().count() <= MAX_CONTENT_CHARS);
            assert!(!validator.is_unsafe(&message.content));
        }
    }
    // Plain text as content.
    let value = serde_json::json!({"role": "user", "content": text});
    let _ = validator.message(&value);
});
