//! The official `openai` Python SDK (pinned in `tests/python/requirements.txt`), unmodified,
//! against the real chatq binary: `chat.completions.create`, `create(stream=True)`, and a 429
//! surfacing as `openai.RateLimitError`. The SDK lives in a virtual environment under
//! `target/tmp/py-venv`, created here on first use (and by `.ci/run` up front).

use std::path::{Path, PathBuf};
use std::process::Command;

fn venv_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("py-venv");
    let python = venv.join("bin").join("python");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let requirements = root.join("tests/python/requirements.txt");
    let marker = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let created = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status();
    assert!(
        created.is_ok_and(|s| s.success()),
        "could not create a Python virtual environment (python3 -m venv)"
    );
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status();
    assert!(
        installed.is_ok_and(|s| s.success()),
        "pip could not install tests/python/requirements.txt"
    );
    std::fs::write(&marker, wanted).unwrap();
    python
}

#[test]
fn the_official_openai_python_sdk_works_unmodified() {
    let python = venv_python();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(python)
        .args(["-m", "unittest", "-v", "tests/python/test_openai_sdk.py"])
        .current_dir(root)
        .env("CHATQ_BIN", env!("CARGO_BIN_EXE_chatq"))
        .output()
        .expect("run python");
    let report = String::from_utf8_lossy(&output.stderr);
    println!("{report}");
    assert!(output.status.success(), "the SDK tests failed:\n{report}");
    assert!(report.contains("Ran 5 tests"), "{report}");
}
