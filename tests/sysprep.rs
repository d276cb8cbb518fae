//! `virt-clone-cow --sysprep` (docs/guest-identity.md) on a real guest filesystem: the tiny guest's
//! ext4 root (tests/guest/build-guest) in qcow2 overlays, reset by the real virt-sysprep
//! (guestfs-tools, LIBGUESTFS_BACKEND=direct; TCG where KVM cannot run its appliance), through
//! the real libvirtd (qemu:///system).
//!
//! The guest's files are read back without libguestfs (whose appliance takes a minute and more
//! to boot under TCG): `qemu-img dd` copies the root partition out of the overlay (through the
//! backing chain) and e2fsprogs' `debugfs` reads files from it.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vcc_tests::*;

/// Where build-guest puts the tiny guest's root partition: after the 1 MiB MBR gap and the
/// 16 MiB boot partition.
const ROOT_OFFSET_MIB: u64 = 17;

/// Boot is bounded as in tests/guest.rs.
const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Files read from every image.
const FILES: &[&str] = &[
    "/etc/machine-id",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/ssh/ssh_host_ed25519_key",
    "/var/lib/dhcp/dhclient.eth0.leases",
    "/etc/os-release",
];

/// The content of each of `files` in the tiny guest's root filesystem on `image` (a qcow2 file,
/// its backing chain followed); None for a file that is not there.
fn guest_files(image: &str, scratch: &Path, files: &[&str]) -> Vec<Option<String>> {
    let part = scratch.join("root.raw");
    run_ok(
        "qemu-img",
        &[
            "dd",
            // Shared: a started clone's QEMU holds its image's lock (the tiny guest never writes
            // its disk, so what is read is what virt-sysprep left).
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=1M",
            &format!("skip={ROOT_OFFSET_MIB}"),
            &format!("if={image}"),
            &format!("of={}", part.display()),
        ],
    );
    let out = files
        .iter()
        .map(|f| {
            // debugfs prints errors on stderr and exits 0 either way: ask whether the file is
            // there first.
            let stat = run("debugfs", &["-R", &format!("stat {f}"), part.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&stat.stderr);
            if err.contains("File not found") {
                return None;
            }
            assert!(stat.status.success(), "debugfs stat {f}: {err}");
            let cat = run("debugfs", &["-R", &format!("cat {f}"), part.to_str().unwrap()]);
            assert!(cat.status.success(), "debugfs cat {f}");
            Some(String::from_utf8_lossy(&cat.stdout).into_owned())
        })
        .collect();
    std::fs::remove_file(&part).unwrap();
    out
}

/// A template on a copy of the tiny master in the env's pool (virt-clone-cow makes a template's
/// master read-only: the shared cached one must stay as it is). Its serial log's name does not
/// hold the template's name. Returns (template, master path).
fn tiny_template(env: &TestEnv) -> (String, String) {
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("tiny.qcow2");
    std::fs::copy(tiny_master(), &master).unwrap();
    env.refresh_pool();
    let log = env.work_dir.join("console.log");
    define_xml(&guest_xml(&tmpl, guest_domain_type(), Path::new(&master), &log));
    (tmpl, master)
}

/// `virt-clone-cow --connect qemu:///system ARGS` with extra environment variables.
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let out = Command::new(cli_path())
        .arg("--connect")
        .arg(URI)
        .args(args)
        .envs(env.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .env_remove("VIRT_CLONE_COW_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn two_clones_with_sysprep_get_their_own_machine_id_and_hostname_and_still_boot() {
    let env = TestEnv::new("sysprep");
    let (tmpl, master) = tiny_template(&env);
    let master_sum = sha256(&master);
    let in_master = guest_files(&master, &env.work_dir, FILES);
    let master_id = in_master[0].clone().expect("the tiny guest has a machine-id").trim().to_string();
    assert_eq!(master_id.len(), 32, "{master_id}");
    assert_eq!(in_master[1].as_deref(), Some("vcc-tiny\n"));
    assert!(in_master[3].is_some() && in_master[4].is_some(), "the master has an SSH host key and a DHCP lease");
    assert!(in_master[5].is_some(), "the master has an os-release (compared with each clone's below)");

    let names = [env.name("-a"), env.name("-b")];
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--sysprep", "--start", "--json"]);
    run.assert_ok();
    let report = run.json();

    let mut ids = vec![master_id.clone()];
    let mut serials = vec![env.in_work("console.log")];
    for (i, name) in names.iter().enumerate() {
        let entry = &report["clones"][i];
        let sp = &entry["sysprep"];
        let ms = sp["ms"].as_f64().unwrap_or_else(|| panic!("sysprep time in the report: {entry:#}"));
        println!("{name}: virt-sysprep took {:.1} s ({}; guests run as {})", ms / 1e3, sp, guest_domain_type());
        // The names here are valid hostnames: the hostname is the clone's name.
        assert_eq!(sp["hostname"].as_str(), Some(name.as_str()));
        let overlay = entry["disks"][0]["overlay"].as_str().unwrap();
        let got = guest_files(overlay, &env.work_dir, FILES);
        let id = got[0].as_deref().expect("the clone has a machine-id").trim().to_string();
        assert_eq!(Some(id.as_str()), sp["machine_id"].as_str(), "{name}: the machine-id is the one reported");
        assert!(id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()), "{name}: {id}");
        assert!(!ids.contains(&id), "{name}: machine-id {id} differs from the master's and the other clone's");
        ids.push(id);
        assert_eq!(got[1].as_deref(), Some(format!("{name}\n").as_str()), "{name}: /etc/hostname");
        let hosts = got[2].as_deref().unwrap();
        assert!(hosts.contains(name.as_str()) && !hosts.contains("vcc-tiny"), "{name}: /etc/hosts\n{hosts}");
        assert_eq!(got[3], None, "{name}: the template's SSH host key is gone");
        assert_eq!(got[4], None, "{name}: the template's DHCP lease is gone");
        assert_eq!(got[5], in_master[5], "{name}: the rest of the guest is the template's");

        // It still boots (from its untouched boot partition), as itself, on its own serial log.
        let f = facts(name);
        assert_eq!(f.char_paths.len(), 1, "{:?}", f.char_paths);
        let log = f.char_paths[0].clone();
        assert!(!serials.contains(&log), "{name}: serial log {log} is its own");
        serials.push(log.clone());
        let (line, _) = wait_for_up(Path::new(&log), BOOT_LIMIT);
        assert_eq!(up_field(&line, "uuid"), Some(domuuid(name).as_str()), "{line}");
    }

    // The master: its bytes unchanged, its files the template's.
    assert_eq!(sha256(&master), master_sum, "the master changed");
    assert_eq!(guest_files(&master, &env.work_dir, FILES), in_master);
}

#[test]
fn a_failed_sysprep_leaves_no_clone_and_the_template_as_it_was() {
    let env = TestEnv::new("sysprep-fail");
    let (tmpl, master) = tiny_template(&env);
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let names = [env.name("-a"), env.name("-b")];
    // libguestfs's hypervisor cannot run: virt-sysprep fails on the first clone, after its overlay
    // was made and the template marked.
    let run = cli_env(
        &["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--sysprep"],
        &[("LIBGUESTFS_HV", "/bin/false")],
    );
    run.assert_error(1, &["virt-sysprep failed on", &names[0]]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(!domain_exists(&names[0]) && !domain_exists(&names[1]));
}

#[test]
fn sysprep_without_virt_sysprep_is_refused_before_anything_is_made() {
    let env = TestEnv::new("sysprep-none");
    let (tmpl, master) = tiny_template(&env);
    // A PATH where virt-sysprep is not.
    let bin = env.work_dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let name = env.name("-a");
    let run = cli_env(&["--original", &tmpl, "--name", &name, "--sysprep"], &[("PATH", bin.to_str().unwrap())]);
    run.assert_error(1, &["--sysprep needs virt-sysprep", "guestfs-tools"]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
}

#[test]
fn sysprep_with_host_is_a_usage_error() {
    let run = cli(&["--original", "x", "--name", "y", "--sysprep", "--host", URI]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--sysprep") && run.stderr.contains("--host"), "{}", run.stderr);
}
