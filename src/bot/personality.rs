//! Personality presets: instructions and temperature per named style.
//!
//! The presets ship in `data/personalities.json` and are compiled into the binary, so chatq
//! runs from any directory. Each preset also carries its offline fallback reply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The preset used when a job names none.
pub const DEFAULT_PERSONALITY: &str = "helpful";

const PRESETS_JSON: &str = include_str!("../../data/personalities.json");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Personality {
    pub name: String,
    pub description: String,
    pub temperature: f32,
    pub instructions: String,
    /// The canned reply given when no upstream is configured.
    pub fallback: String,
}

/// The set of known personalities, by name.
#[derive(Debug, Clone)]
pub struct Personalities {
    by_name: BTreeMap<String, Personality>,
}

impl Personalities {
    /// The presets shipped with chatq.
    pub fn builtin() -> Self {
        let list: Vec<Personality> =
            serde_json::from_str(PRESETS_JSON).expect("data/personalities.json is valid JSON");
        Self::from_list(list)
    }

    pub fn from_list(list: Vec<Personality>) -> Self {
        Self {
            by_name: list.into_iter().map(|p| (p.name.clone(), p)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Personality> {
        self.by_name.get(name)
    }

    /// The named preset, or the default one when `name` is `None` or unknown.
    pub fn resolve(&self, name: Option<&str>) -> &Personality {
        name.and_then(|n| self.by_name.get(n))
            .or_else(|| self.by_name.get(DEFAULT_PERSONALITY))
            .or_else(|| self.by_name.values().next())
            .expect("at least one personality is configured")
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Personality> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_have_the_documented_temperatures() {
        let p = Personalities::builtin();
        for (name, t) in [
            ("helpful", 0.7),
            ("sarcastic", 0.9),
            ("professional", 0.5),
            ("creative", 1.0),
            ("technical", 0.6),
        ] {
            let preset = p.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(preset.temperature, t, "{name}");
            assert!(!preset.instructions.is_empty() && !preset.fallback.is_empty());
        }
    }

    #[test]
    fn unknown_or_missing_name_resolves_to_the_default() {
        let p = Personalities::builtin();
        assert_eq!(p.resolve(None).name, "helpful");
        assert_eq!(p.resolve(Some("nope")).name, "helpful");
        assert_eq!(p.resolve(Some("technical")).name, "technical");
    }
}
