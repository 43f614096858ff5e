//! Typed, validated configuration.
//!
//! Raw CLI and environment values ([`crate::cli`]) become a [`Config`] whose fields are
//! already checked; an invalid value is refused at start with a message naming the flag.
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value.

use std::fmt;

/// A secret string (API key, bearer token). Printing it shows `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
