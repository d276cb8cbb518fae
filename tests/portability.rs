//! Hermetic checks that the test suite itself runs on any machine of this kind (issue 10, item 9):
//! no test guest depends on the host CPU model, and the README's test command runs every test
//! binary even after a failure. They read the repository's own files; they start nothing.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Every file below `dir` (recursively) whose name ends in one of `exts` or has no extension.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "target" || name.starts_with('.') || name == "__pycache__" {
            continue;
        }
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The code lines (comments dropped) of every test, bench, lab and script file.
fn code_lines() -> Vec<(PathBuf, usize, String)> {
    let root = repo();
    let mut paths = Vec::new();
    for d in ["tests", "pool-helper/tests", "scripts", "hooks/tests", "virt-clone-cow/tests"] {
        files(&root.join(d), &mut paths);
    }
    let mut out = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        for (i, l) in text.lines().enumerate() {
            let t = l.trim_start();
            if t.starts_with("//") || t.starts_with('#') {
                continue;
            }
            out.push((p.clone(), i + 1, l.to_string()));
        }
    }
    out
}

#[test]
fn no_test_guest_asks_for_the_host_cpu_model() {
    // host-passthrough and host-model abort QEMU on some hosts of this kind ("failed to set MSR
    // 0x10a"); guests without <cpu> (qemu64) start everywhere.
    let this = Path::new(file!()).file_name().map(|f| f.to_os_string());
    let bad: Vec<String> = code_lines()
        .into_iter()
        .filter(|(p, _, l)| {
            p.file_name().map(|f| f.to_os_string()) != this
                && (l.contains("host-passthrough") || l.contains("host-model"))
        })
        .map(|(p, n, l)| format!("{}:{n}: {}", p.display(), l.trim()))
        .collect();
    assert!(bad.is_empty(), "test guests must not use the host CPU model:\n{}", bad.join("\n"));
}

#[test]
fn every_virt_install_in_the_tests_names_a_cpu_model() {
    // virt-install's default CPU is host-passthrough: each call must pass --cpu.
    for (p, text) in code_lines().into_iter().fold(Vec::<(PathBuf, String)>::new(), |mut acc, (p, _, l)| {
        match acc.last_mut() {
            Some((q, t)) if *q == p => {
                t.push_str(&l);
                t.push('\n');
            }
            _ => acc.push((p, l + "\n")),
        }
        acc
    }) {
        let calls = text.matches("\"virt-install\"").count();
        let cpus = text.matches("\"--cpu\"").count();
        assert!(cpus >= calls, "{}: {calls} virt-install call(s) but {cpus} --cpu", p.display());
    }
}

#[test]
fn the_test_command_runs_every_test_binary_even_after_a_failure() {
    let script = std::fs::read_to_string(repo().join("scripts/test")).expect("scripts/test");
    let cargo_test =
        script.lines().find(|l| l.trim_start().starts_with("cargo test --workspace")).expect("a cargo test line");
    assert!(cargo_test.contains("--no-fail-fast"), "{cargo_test}");
    assert!(cargo_test.contains("--all-features"), "{cargo_test}");
}
