//! The Python virtual environment for the tests that drive chatq from Python (the official
//! `openai` SDK, Selenium for the browser test): `target/tmp/py-venv`, with the pinned
//! requirements of `tests/python` and `tests/browser`, created on first use (and by `.ci/run`
//! up front).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

const REQUIREMENTS: [&str; 2] = [
    "tests/python/requirements.txt",
    "tests/browser/requirements.txt",
];

/// Serialises venv creation between the tests of this binary.
static VENV: Mutex<()> = Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv_python() -> PathBuf {
    let _guard = VENV.lock().unwrap_or_else(|p| p.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("py-venv");
    let python = venv.join("bin").join("python");
    let marker = venv.join("requirements.installed");
    let wanted: String = REQUIREMENTS
        .iter()
        .map(|r| std::fs::read_to_string(root().join(r)).unwrap())
        .collect();
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
    for requirements in REQUIREMENTS {
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(root().join(requirements))
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()),
            "pip could not install {requirements}"
        );
    }
    std::fs::write(&marker, wanted).unwrap();
    python
}

/// Runs a unittest file against the chatq binary and returns its output.
pub fn run_unittest(file: &str) -> Output {
    Command::new(venv_python())
        .args(["-m", "unittest", "-v", file])
        .current_dir(root())
        .env("CHATQ_BIN", env!("CARGO_BIN_EXE_chatq"))
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("run python")
}
