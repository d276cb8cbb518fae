//! Real guests (docs/guests.md): the tiny master, built from Debian's packages by
//! `tests/guest/build-guest`, boots from qcow2 overlays through the real libvirtd
//! (qemu:///system), from its disk (SeaBIOS, syslinux), and says it is up on its serial console.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use vcc_tests::*;

/// Boot is bounded: TCG on a busy 2-core machine took ~7 s; this leaves room.
const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Defines a guest on a fresh overlay of `master` in the env's pool; returns (name, serial log).
fn define_clone(env: &TestEnv, master: &Path, suffix: &str) -> (String, std::path::PathBuf) {
    define_clone_of(env, master, "qcow2", suffix)
}

fn define_clone_of(env: &TestEnv, master: &Path, format: &str, suffix: &str) -> (String, std::path::PathBuf) {
    let name = env.name(suffix);
    let overlay = env.pool_dir.join(format!("{suffix}.qcow2"));
    make_overlay_of(master, format, &overlay);
    let log = env.work_dir.join(format!("{suffix}.serial.log"));
    define_xml(&guest_xml(&name, guest_domain_type(), &overlay, &log));
    (name, log)
}

#[test]
fn tiny_guest_boots_from_an_overlay_and_reads_only_its_boot_files() {
    let master = tiny_master();
    let master_sum = sha256(master);
    let master_size = std::fs::metadata(master).unwrap().len();
    let env = TestEnv::new("guest-boot");
    let (name, log) = define_clone(&env, master, "-a");

    let (line, took) = start_and_wait_up(&name, &log, BOOT_LIMIT);
    let read = disk_read_bytes(&name, "vda");
    println!(
        "tiny guest ({}) up in {:.2} s from `virsh start` (guest uptime {} s); boot read {read} bytes \
         ({:.1} MiB) of a {:.0} MiB disk; master file {master_size} bytes",
        guest_domain_type(),
        took.as_secs_f64(),
        up_field(&line, "uptime").unwrap_or("?"),
        read as f64 / 1048576.0,
        256.0
    );
    // The line names this domain: the guest read its SMBIOS UUID, which libvirt sets to the domain's.
    assert_eq!(up_field(&line, "uuid"), Some(domuuid(&name).as_str()), "up line: {line}");
    assert_eq!(up_field(&line, "host"), Some("vcc-tiny"), "up line: {line}");
    assert_eq!(domstate(&name), "running");
    // The kernel and initramfs were read from the disk (the guest booted from it, not -kernel)...
    assert!(read > 4 * 1048576, "boot read only {read} bytes");
    // ...and nothing past the 17 MiB boot partition: the padding is never read.
    assert!(read < 17 * 1048576, "boot read {read} bytes");

    virsh_ok(&["destroy", &name]);
    assert_eq!(sha256(master), master_sum, "the master changed");
}

#[test]
fn tiny_guest_boots_from_an_overlay_of_the_raw_master() {
    let master = tiny_master_raw();
    assert_eq!(std::fs::metadata(master).unwrap().len(), 256 * 1048576);
    let env = TestEnv::new("guest-raw");
    let (name, log) = define_clone_of(&env, master, "raw", "-w");
    let (line, took) = start_and_wait_up(&name, &log, BOOT_LIMIT);
    println!("tiny guest on a raw master ({}) up in {:.2} s", guest_domain_type(), took.as_secs_f64());
    assert_eq!(up_field(&line, "uuid"), Some(domuuid(&name).as_str()), "up line: {line}");
    let read = disk_read_bytes(&name, "vda");
    assert!(read > 4 * 1048576 && read < 17 * 1048576, "boot read {read} bytes");
}

#[test]
fn two_clones_of_one_master_both_boot() {
    let master = tiny_master();
    let env = TestEnv::new("guest-two");
    let (a, log_a) = define_clone(&env, master, "-a");
    let (b, log_b) = define_clone(&env, master, "-b");

    let t0 = std::time::Instant::now();
    virsh_ok(&["start", &a]);
    virsh_ok(&["start", &b]);
    let (line_a, _) = wait_for_up(&log_a, BOOT_LIMIT);
    let took_a = t0.elapsed();
    let (line_b, _) = wait_for_up(&log_b, BOOT_LIMIT);
    let took_b = t0.elapsed();
    println!(
        "two clones ({}) of one master up: {:.2} s and {:.2} s after the first `virsh start` (seen in turn)",
        guest_domain_type(),
        took_a.as_secs_f64(),
        took_b.as_secs_f64()
    );
    assert_eq!(up_field(&line_a, "uuid"), Some(domuuid(&a).as_str()), "up line of {a}: {line_a}");
    assert_eq!(up_field(&line_b, "uuid"), Some(domuuid(&b).as_str()), "up line of {b}: {line_b}");
    assert_ne!(domuuid(&a), domuuid(&b));
    assert_eq!(domstate(&a), "running");
    assert_eq!(domstate(&b), "running");
}

#[test]
fn realistic_guest_boots_to_a_login_prompt() {
    let master = realistic_master();
    let env = TestEnv::new("guest-real");
    let (name, log) = define_clone(&env, master, "-r");

    let (line, took) = start_and_wait_up(&name, &log, Duration::from_secs(600));
    let read = disk_read_bytes(&name, "vda");
    println!(
        "realistic guest ({}) up in {:.2} s from `virsh start` (guest uptime {} s); boot read {read} bytes \
         ({:.1} MiB) of a 2048 MiB disk",
        guest_domain_type(),
        took.as_secs_f64(),
        up_field(&line, "uptime").unwrap_or("?"),
        read as f64 / 1048576.0
    );
    assert_eq!(up_field(&line, "uuid"), Some(domuuid(&name).as_str()), "up line: {line}");
    assert_eq!(up_field(&line, "host"), Some("vcc-realistic"), "up line: {line}");
    // systemd's serial getty on ttyS0 (console=ttyS0) offers a login.
    let prompt = wait_for_text(&log, "vcc-realistic login:", Duration::from_secs(120));
    println!("login prompt {:.2} s after the up line", prompt.as_secs_f64());
    assert!(read > 16 * 1048576, "boot read only {read} bytes");
    assert!(read < 1024 * 1048576, "boot read {read} bytes");
}
