//! `contrib/chatq.service`: the systemd unit README's "Running as a service" installs.

use std::path::Path;
use std::process::Command;

#[test]
fn the_systemd_unit_is_sandboxed_and_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/chatq.service")).unwrap();
    for directive in [
        "DynamicUser=yes",
        "StateDirectory=chatq",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/chatq serve --data-dir ${STATE_DIRECTORY}/db",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == directive),
            "the unit has {directive}"
        );
    }
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "systemd-analyze is not installed: the unit was checked for its directives only"
        );
        return;
    };
    assert!(version.status.success());
    // Verified as installed, with the binary where the unit expects it (here: this build's).
    let dir = tempfile::tempdir().unwrap();
    let installed = unit.replace("/usr/local/bin/chatq", env!("CARGO_BIN_EXE_chatq"));
    let path = dir.path().join("chatq.service");
    std::fs::write(&path, installed).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
}
