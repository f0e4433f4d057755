// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! scripts/lib/cache.sh, which keeps the QEMU and kernel build caches from
//! growing without bound: after a build, only the most recently used builds
//! of its kind stay. Runs the shell library on a scratch cache root (no QEMU,
//! no guest: this tier always runs).

use std::path::Path;
use std::process::Command;

use qemu_tests::{repo, scratch};

/// A build directory under `root` holding `mark`, written at `day`
/// (2026-01-DD), and stamped used at `used_day` if any.
fn build(root: &Path, name: &str, mark: &str, day: u32, used_day: Option<u32>) {
    let dir = root.join(name);
    let file = dir.join(mark);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"").unwrap();
    touch(&file, day);
    if let Some(d) = used_day {
        let used = dir.join(".used");
        std::fs::write(&used, b"").unwrap();
        touch(&used, d);
    }
}

fn touch(path: &Path, day: u32) {
    let st = Command::new("touch")
        .arg("-d")
        .arg(format!("2026-01-{day:02}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// `cache_prune root mark keep_dir` with `VUI_CACHE_KEEP=keep`: status and
/// stderr.
fn prune(root: &Path, mark: &str, keep_dir: &str, keep: &str) -> (bool, String) {
    let lib = repo().join("scripts/lib/cache.sh");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#". "$1"; cache_prune "$2" "$3" "$2/$4""#)
        .arg("sh")
        .arg(lib)
        .arg(root)
        .arg(mark)
        .arg(keep_dir)
        .env("VUI_CACHE_KEEP", keep)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn entries(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const X86: &str = "bin/qemu-system-x86_64";
const ARM: &str = "bin/qemu-system-aarch64";

#[test]
fn a_build_keeps_the_builds_of_its_kind_used_last_and_removes_the_others() {
    let root = scratch("build-cache-prune");
    // Written on days 1..=5; old-1 was used on day 9, after all of them.
    build(&root, "old-1", X86, 1, Some(9));
    for d in 2..=5 {
        build(&root, &format!("old-{d}"), X86, d, None);
    }
    // The new build, older on disk than old-5 (a ccache hit copies
    // nothing new): kept because it is the one just built.
    build(&root, "new", X86, 3, None);
    // Another kind, older than everything: not counted, not removed.
    build(&root, "arm", ARM, 1, None);
    // Not builds: the shared download and work directories.
    std::fs::create_dir_all(root.join("downloads")).unwrap();
    std::fs::create_dir_all(root.join("work/new")).unwrap();

    let (ok, err) = prune(&root, X86, "new", "3");
    assert!(ok, "{err}");
    assert_eq!(
        entries(&root),
        ["arm", "downloads", "new", "old-1", "old-5", "work"],
        "{err}"
    );
    // One line per removal, saying what and why.
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    for removed in ["old-4", "old-3", "old-2"] {
        assert!(
            err.contains(&format!("{removed} (last used 2026-01-0")),
            "{err}"
        );
    }
    assert!(err.contains("VUI_CACHE_KEEP=3"), "{err}");
}

#[test]
fn keep_zero_keeps_everything_and_a_bad_keep_is_an_error() {
    let root = scratch("build-cache-keep");
    for d in 1..=4 {
        build(&root, &format!("b{d}"), "bzImage", d, None);
    }
    let (ok, err) = prune(&root, "bzImage", "b1", "0");
    assert!(ok && err.is_empty(), "{err}");
    assert_eq!(entries(&root), ["b1", "b2", "b3", "b4"]);

    let (ok, err) = prune(&root, "bzImage", "b1", "three");
    assert!(!ok);
    assert!(err.contains("VUI_CACHE_KEEP must be a number"), "{err}");
    assert_eq!(entries(&root).len(), 4);

    // Keep 1: only the build just made.
    let (ok, err) = prune(&root, "bzImage", "b1", "1");
    assert!(ok, "{err}");
    assert_eq!(entries(&root), ["b1"]);
}

#[test]
fn a_build_is_stamped_when_used() {
    let root = scratch("build-cache-used");
    build(&root, "b", "bzImage", 1, None);
    let lib = repo().join("scripts/lib/cache.sh");
    let st = Command::new("sh")
        .arg("-c")
        .arg(r#". "$1"; cache_used "$2""#)
        .arg("sh")
        .arg(lib)
        .arg(root.join("b"))
        .status()
        .unwrap();
    assert!(st.success());
    let used = std::fs::metadata(root.join("b/.used")).unwrap();
    let age = used.modified().unwrap().elapsed().unwrap_or_default();
    assert!(age.as_secs() < 600, "stamped {age:?} ago");
}
