//! The official `openai` Python SDK (pinned in `tests/python/requirements.txt`), unmodified,
//! against the real chatq binary: `chat.completions.create`, `create(stream=True)`, and a 429
//! surfacing as `openai.RateLimitError`.

use crate::python::run_unittest;

#[test]
fn the_official_openai_python_sdk_works_unmodified() {
    let output = run_unittest("tests/python/test_openai_sdk.py");
    let report = String::from_utf8_lossy(&output.stderr);
    println!("{report}");
    assert!(output.status.success(), "the SDK tests failed:\n{report}");
    assert!(report.contains("Ran 5 tests"), "{report}");
}
