// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! scripts/install.sh puts each file where it says, twice over, and what it
//! installs names the installed daemon.

use std::path::Path;
use std::process::Command;

use test_frontend::daemon::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/install.sh");

fn install(destdir: &Path) -> String {
    let out = Command::new("sh")
        .arg(SCRIPT)
        .args(["--prefix", "/usr", "--bin", BIN, "--destdir"])
        .arg(destdir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn install_puts_the_daemon_its_json_manual_units_and_licences_in_place() {
    let dir = Scratch::new("install");
    let root = dir.path();
    install(root);
    // Again: the same files, no error.
    let said = install(root);
    assert!(said.contains("installed vhost-user-iommu under"), "{said}");
    let usr = root.join("usr");
    let daemon = usr.join("libexec/vhost-user-iommu");
    let v = Command::new(&daemon).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains("mirror protocol"));
    let json = std::fs::read_to_string(usr.join("share/qemu/vhost-user/50-vhost-user-iommu.json"))
        .unwrap();
    assert!(json.contains("\"binary\": \"/usr/libexec/vhost-user-iommu\""));
    let man = std::fs::read_to_string(usr.join("share/man/man8/vhost-user-iommu.8")).unwrap();
    assert!(man.contains(".TH vhost-user-iommu 8"), "{man}");
    assert!(man.contains("seccomp"));
    for unit in ["vhost-user-iommu@.socket", "vhost-user-iommu@.service"] {
        assert!(usr.join("lib/systemd/system").join(unit).exists(), "{unit}");
    }
    let service =
        std::fs::read_to_string(usr.join("lib/systemd/system/vhost-user-iommu@.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/libexec/vhost-user-iommu "));
    for doc in [
        "README.md",
        "CHANGELOG.md",
        "LICENSE-APACHE",
        "LICENSE-BSD-3-Clause",
    ] {
        assert!(
            usr.join("share/doc/vhost-user-iommu").join(doc).exists(),
            "{doc}"
        );
    }
    // The manual page renders, where man(1) is installed.
    if let Ok(out) = Command::new("man")
        .arg("-l")
        .arg(usr.join("share/man/man8/vhost-user-iommu.8"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("--mirror-socket"),
            "{text}"
        );
    } else {
        eprintln!("SKIP rendering the manual page: man(1) is not installed");
    }
}

#[test]
fn install_help_does_no_work() {
    let out = Command::new("sh")
        .args([SCRIPT, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: scripts/install.sh"));
}
