//! The chat page and the admin dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs), driven by Selenium from
//! `tests/browser/test_pages.py`: a streamed reply, HTML in a reply shown as text and run
//! never, the rate limit in words, admin counts, retry of a failed job, a filtered log.
//! Screenshots go to a temporary folder named in the output.

use std::path::Path;

use crate::python::run_unittest;

#[test]
fn pages_work_in_headless_chromium() {
    for binary in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
        );
    }
    let output = run_unittest("tests/browser/test_pages.py");
    let report = String::from_utf8_lossy(&output.stderr);
    println!("{}{report}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "the browser tests failed:\n{report}"
    );
    assert!(report.contains("Ran 4 tests"), "{report}");
}
