//! Message validation, exactly as the replaced system did it (DESIGN section 5).
//!
//! The checks run in a fixed order and the first failure wins, with its message verbatim.
//! The unsafe patterns are compiled once into a [`RegexSet`]; checking a message allocates
//! nothing per pattern. This module only judges input: it never stores or sends anything.

use regex::RegexSet;
use serde::Serialize;
use serde_json::Value;

use crate::domain::Role;

/// Longest accepted message content, in characters, counted before trimming.
pub const MAX_CONTENT_CHARS: usize = 10_000;

/// Why a message was refused. `Display` is the exact message clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("Invalid message format")]
    InvalidFormat,
    #[error("Invalid message role")]
    InvalidRole,
    #[error("Message content is required")]
    ContentRequired,
    #[error("Message content too long (max 10000 characters)")]
    TooLong,
    #[error("Message contains potentially unsafe content")]
    Unsafe,
}

impl ValidationError {
    /// A stable machine-readable code for the error shape.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidFormat => "invalid_message_format",
            Self::InvalidRole => "invalid_message_role",
            Self::ContentRequired => "message_content_required",
            Self::TooLong => "message_content_too_long",
            Self::Unsafe => "unsafe_content",
        }
    }

    /// The request field the error is about.
    pub fn param(self) -> Option<&'static str> {
        match self {
            Self::InvalidFormat => None,
            Self::InvalidRole => Some("role"),
            Self::ContentRequired | Self::TooLong | Self::Unsafe => Some("content"),
        }
    }
}

/// A message that passed validation: content trimmed, with the time it was checked.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ValidatedMessage {
    pub role: Role,
    pub content: String,
    /// RFC 3339, UTC.
    pub validated_at: String,
}

/// One message's outcome in a bulk validation.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BulkItem {
    pub index: usize,
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validated_message: Option<ValidatedMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BulkSummary {
    pub total: usize,
    pub success: usize,
    pub errors: usize,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BulkOutcome {
    /// True only if every message passed.
    pub success: bool,
    pub conversation_id: String,
    pub results: Vec<BulkItem>,
    pub summary: BulkSummary,
}

/// The validator; build once and share.
#[derive(Debug, Clone)]
pub struct Validator {
    unsafe_patterns: RegexSet,
}

impl Default for Validator {
    fn default() -> Self {
        Self::new()
    }
}

impl Validator {
    pub fn new() -> Self {
        // Literal patterns, checked case-insensitively; a constant set that is known to compile.
        let unsafe_patterns = RegexSet::new([
            r"(?i)<script",
            r"(?i)javascript:",
            r"(?i)data:text/html",
            r"(?i)vbscript:",
        ])
        .expect("the built-in unsafe-content patterns compile");
        Self { unsafe_patterns }
    }

    /// True if `text` contains one of the unsafe patterns, as written or disguised the way
    /// browsers still execute it: split by the tab, newline and other control characters that
    /// URL parsers drop, or written with HTML character references (`&#106;`, `&#x6A;`,
    /// `&colon;`, `&Tab;`, `&lt;`, ...). See [`reveal`].
    pub fn is_unsafe(&self, text: &str) -> bool {
        // Every pattern needs `<` or `:`, and a disguise needs `&` for a character reference;
        // text with none of them (most chat) skips the work.
        let bytes = text.as_bytes();
        if !bytes.iter().any(|&b| matches!(b, b'<' | b':' | b'&')) {
            return false;
        }
        if self.unsafe_patterns.is_match(text) {
            return true;
        }
        let needs_reveal = bytes.iter().any(|&b| b == b'&' || (b < 0x20 && b != b' '));
        needs_reveal && self.unsafe_patterns.is_match(&reveal(text))
    }

    /// Checks content alone (checks 3 to 5): required, length, unsafe patterns.
    /// Returns the trimmed content.
    pub fn check_content<'a>(
        &self,
        content: &'a str,
        max_chars: usize,
    ) -> Result<&'a str, ValidationError> {
        let trimmed = content.trim();
        if trimmed.is_empty() {
            return Err(ValidationError::ContentRequired);
        }
        // Counted before trimming; cheap byte-length test first.
        if content.len() > max_chars && content.chars().count() > max_chars {
            return Err(ValidationError::TooLong);
        }
        if self.is_unsafe(content) {
            return Err(ValidationError::Unsafe);
        }
        Ok(trimmed)
    }

    /// Validates one message (any JSON value), in the documented order.
    pub fn message(&self, value: &Value) -> Result<ValidatedMessage, ValidationError> {
        let (role, content) = self.message_parts(value, false)?;
        Ok(ValidatedMessage {
            role,
            content: content.to_owned(),
            validated_at: now_rfc3339(),
        })
    }

    /// Validates one message and returns its role and trimmed content. `allow_system` admits
    /// the `system` role (OpenAI-compatible clients send it).
    pub fn message_parts<'a>(
        &self,
        value: &'a Value,
        allow_system: bool,
    ) -> Result<(Role, &'a str), ValidationError> {
        let object = value.as_object().ok_or(ValidationError::InvalidFormat)?;
        let role = match object.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("system") if allow_system => Role::System,
            _ => return Err(ValidationError::InvalidRole),
        };
        let content = object
            .get("content")
            .and_then(Value::as_str)
            .ok_or(ValidationError::ContentRequired)?;
        Ok((role, self.check_content(content, MAX_CONTENT_CHARS)?))
    }

    /// Validates each message independently.
    pub fn bulk(&self, conversation_id: String, messages: &[Value]) -> BulkOutcome {
        let results: Vec<BulkItem> = messages
            .iter()
            .enumerate()
            .map(|(index, value)| match self.message(value) {
                Ok(message) => BulkItem {
                    index,
                    success: true,
                    validated_message: Some(message),
                    error: None,
                },
                Err(e) => BulkItem {
                    index,
                    success: false,
                    validated_message: None,
                    error: Some(e.to_string()),
                },
            })
            .collect();
        let ok = results.iter().filter(|r| r.success).count();
        BulkOutcome {
            success: ok == results.len(),
            conversation_id,
            summary: BulkSummary {
                total: results.len(),
                success: ok,
                errors: results.len() - ok,
            },
            results,
        }
    }
}

/// The text a browser would act on: HTML character references decoded (numeric ones and the
/// named ones that spell the patterns: `lt`, `gt`, `colon`, `sol`, `Tab`, `NewLine`, `amp`,
/// `quot`, `apos`), then every C0 control character removed (URL parsers drop tab, CR and LF
/// anywhere in a URL). One allocation per message, only for text that has `&` or a control
/// character.
pub fn reveal(text: &str) -> String {
    let mut decoded = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        decoded.push_str(&rest[..amp]);
        rest = &rest[amp..];
        match decode_reference(rest) {
            Some((c, used)) => {
                decoded.push(c);
                rest = &rest[used..];
            }
            None => {
                decoded.push('&');
                rest = &rest[1..];
            }
        }
    }
    decoded.push_str(rest);
    decoded.retain(|c| !(c.is_ascii_control() && c != ' ') && c != '\u{7f}');
    decoded
}

/// Decodes the character reference at the start of `s` (which starts with `&`); returns the
/// character and the bytes it used. The `;` is optional, as browsers accept it in attributes.
fn decode_reference(s: &str) -> Option<(char, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (num, 10, 1),
        };
        let len = digits
            .char_indices()
            .take_while(|(_, c)| c.is_digit(radix))
            .map(|(i, c)| i + c.len_utf8())
            .last()?;
        let value = u32::from_str_radix(&digits[..len.min(12)], radix).ok()?;
        let c = char::from_u32(value)?;
        let mut used = 1 + skip + len;
        if s[used..].starts_with(';') {
            used += 1;
        }
        return Some((c, used));
    }
    const NAMED: [(&str, char); 9] = [
        ("lt", '<'),
        ("gt", '>'),
        ("colon", ':'),
        ("sol", '/'),
        ("Tab", '\t'),
        ("NewLine", '\n'),
        ("amp", '&'),
        ("quot", '"'),
        ("apos", '\''),
    ];
    NAMED.iter().find_map(|(name, c)| {
        let after = body.strip_prefix(name)?;
        let used = 1 + name.len() + usize::from(after.starts_with(';'));
        Some((*c, used))
    })
}

/// The current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: Value) -> Result<ValidatedMessage, ValidationError> {
        Validator::new().message(&value)
    }

    #[test]
    fn every_rule_and_boundary() {
        use ValidationError::*;
        let long = |n: usize| "a".repeat(n);
        let cases: Vec<(Value, Result<&str, ValidationError>)> = vec![
            (json!("just a string"), Err(InvalidFormat)),
            (json!(null), Err(InvalidFormat)),
            (
                json!([{"role": "user", "content": "hi"}]),
                Err(InvalidFormat),
            ),
            (json!(42), Err(InvalidFormat)),
            (json!({"content": "hi"}), Err(InvalidRole)),
            (json!({"role": "system", "content": "hi"}), Err(InvalidRole)),
            (json!({"role": "User", "content": "hi"}), Err(InvalidRole)),
            (json!({"role": 1, "content": "hi"}), Err(InvalidRole)),
            (json!({"role": "user"}), Err(ContentRequired)),
            (json!({"role": "user", "content": 5}), Err(ContentRequired)),
            (
                json!({"role": "user", "content": null}),
                Err(ContentRequired),
            ),
            (json!({"role": "user", "content": ""}), Err(ContentRequired)),
            (
                json!({"role": "user", "content": " \n\t "}),
                Err(ContentRequired),
            ),
            (
                json!({"role": "user", "content": long(10_000)}),
                Ok("10000"),
            ),
            (
                json!({"role": "user", "content": long(10_001)}),
                Err(TooLong),
            ),
            // Counted before trimming: 9999 letters plus two spaces is too long.
            (
                json!({"role": "user", "content": format!(" {} ", long(9_999))}),
                Err(TooLong),
            ),
            // Characters, not bytes: 10000 two-byte letters pass.
            (
                json!({"role": "user", "content": "é".repeat(10_000)}),
                Ok("10000"),
            ),
            (
                json!({"role": "user", "content": "<ScRiPt>alert(1)"}),
                Err(Unsafe),
            ),
            (
                json!({"role": "user", "content": "go to JavaScript:void(0)"}),
                Err(Unsafe),
            ),
            (
                json!({"role": "user", "content": "DATA:TEXT/HTML,<b>"}),
                Err(Unsafe),
            ),
            (
                json!({"role": "assistant", "content": "VbScRiPt:msgbox"}),
                Err(Unsafe),
            ),
            // The role is checked before the content: a bad role wins over bad content.
            (
                json!({"role": "bot", "content": "<script>"}),
                Err(InvalidRole),
            ),
            // Length is checked before the patterns.
            (
                json!({"role": "user", "content": format!("<script>{}", long(10_000))}),
                Err(TooLong),
            ),
            (json!({"role": "user", "content": "  hello  "}), Ok("hello")),
            (
                json!({"role": "assistant", "content": "I <3 my script, x < y"}),
                Ok("I <3 my script, x < y"),
            ),
        ];
        for (input, expected) in cases {
            let got = check(input.clone());
            match (expected, got) {
                (Ok("10000"), Ok(m)) => assert_eq!(m.content.chars().count(), 10_000),
                (Ok(content), Ok(m)) => assert_eq!(m.content, content, "{input}"),
                (Err(e), Err(g)) => assert_eq!(e, g, "{input}"),
                (e, g) => panic!("{input}: expected {e:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn disguised_patterns_are_caught_and_ordinary_chat_passes() {
        let v = Validator::new();
        for disguised in [
            "&#106;avascript:alert(1)",
            "&#0000106avascript:alert(1)",
            "&#x6A;avascript:alert(1)",
            "&#X6a;AVASCRIPT:alert(1)",
            "java\tscript:alert(1)",
            "java\nscript:alert(1)",
            "java\r\nscript:alert(1)",
            "java\u{0}script:alert(1)",
            "java&Tab;script:alert(1)",
            "java&NewLine;script:alert(1)",
            "javascript&colon;alert(1)",
            "jav&#x09;ascript:alert(1)",
            "vb\tscript&#58;msgbox",
            "data:text&sol;html,<b>",
            "data&colon;text/html;base64,PHNjcmlwdD4=",
            "&lt;script>alert(1)</script>",
            "&#60;ScRiPt src=//x>",
        ] {
            assert!(v.is_unsafe(disguised), "{disguised:?} should be caught");
            assert_eq!(
                v.message(&serde_json::json!({"role": "user", "content": disguised})),
                Err(ValidationError::Unsafe)
            );
        }
        for ordinary in [
            "I <3 you",
            "x < y and y > z",
            "my script is ready",
            "meet at 10:30, bring snacks",
            "AT&T: fine, fish & chips: great",
            "Tom &amp; Jerry &copy; 1940",
            "java script: two words",
            "&#; &#x; &; &lt",
            "data: text/html is a MIME type",
        ] {
            assert!(!v.is_unsafe(ordinary), "{ordinary:?} should pass");
        }
    }

    #[test]
    fn reveal_decodes_references_and_drops_controls() {
        assert_eq!(reveal("a&#98;c"), "abc");
        assert_eq!(
            reveal("a&#x62c"),
            "a\u{62c}",
            "hex digits run on, as in browsers"
        );
        assert_eq!(reveal("x&lt;y&gt;z&colon;"), "x<y>z:");
        assert_eq!(reveal("a\tb\nc d"), "abc d");
        assert_eq!(reveal("&unknown; & &#xZZ;"), "&unknown; & &#xZZ;");
        assert_eq!(reveal("&#99999999999;"), "&#99999999999;");
    }

    #[test]
    fn messages_are_the_documented_text() {
        use ValidationError::*;
        assert_eq!(InvalidFormat.to_string(), "Invalid message format");
        assert_eq!(InvalidRole.to_string(), "Invalid message role");
        assert_eq!(ContentRequired.to_string(), "Message content is required");
        assert_eq!(
            TooLong.to_string(),
            "Message content too long (max 10000 characters)"
        );
        assert_eq!(
            Unsafe.to_string(),
            "Message contains potentially unsafe content"
        );
    }

    #[test]
    fn valid_message_has_role_trimmed_content_and_timestamp() {
        let m = check(json!({"role": "user", "content": "  hi  "})).unwrap();
        assert_eq!(m.role, Role::User);
        assert_eq!(m.content, "hi");
        assert!(m.validated_at.ends_with('Z') && m.validated_at.len() == 24);
    }

    #[test]
    fn system_role_only_when_allowed() {
        let v = Validator::new();
        let msg = json!({"role": "system", "content": "be brief"});
        assert_eq!(
            v.message_parts(&msg, false),
            Err(ValidationError::InvalidRole)
        );
        assert_eq!(v.message_parts(&msg, true), Ok((Role::System, "be brief")));
    }

    #[test]
    fn bulk_validates_each_message_and_summarises() {
        let v = Validator::new();
        let msgs = vec![
            json!({"role": "user", "content": "hello"}),
            json!({"role": "system", "content": "x"}),
            json!({"role": "assistant", "content": " fine "}),
            json!("nope"),
        ];
        let out = v.bulk("c1".into(), &msgs);
        assert!(!out.success);
        assert_eq!(
            out.summary,
            BulkSummary {
                total: 4,
                success: 2,
                errors: 2
            }
        );
        assert_eq!(
            out.results[1].error.as_deref(),
            Some("Invalid message role")
        );
        assert_eq!(
            out.results[3].error.as_deref(),
            Some("Invalid message format")
        );
        assert_eq!(
            out.results[2].validated_message.as_ref().unwrap().content,
            "fine"
        );
        let all_ok = v.bulk("c2".into(), &msgs[..1]);
        assert!(all_ok.success);
        let empty = v.bulk("c3".into(), &[]);
        assert!(empty.success);
        assert_eq!(empty.summary.total, 0);
    }
}
