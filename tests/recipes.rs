//! The recipes of docs/recipes/, run as their users would run them, against the real libvirtd
//! (qemu:///system) with the freshly built hook installed in /etc/libvirt/hooks/qemu.d:
//!
//! - Ansible: docs/recipes/ansible/linked-clone.yml through `ansible-playbook` (connection local);
//! - Terraform: the provider is not installable here (docs/recipes/terraform/README.md), so the
//!   volume and domain XML the dmacvicar/libvirt provider sends go through virsh instead;
//! - virt-manager: the `virsh vol-create-as --backing-vol` equivalent of its volume dialog.
//!
//! Each test keeps its master and overlays in a storage pool of its own over
//! /var/lib/vcc-tests/vcct-recipes-<test>-<pid> (a pool's directory is one the hook may write in
//! with its default settings), and removes its domains, pool and files on drop, also on failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use vcc_tests::{
    bios_domain_type, domstate, esc, install_built_hook, random_bytes, repo_root, run_ok, sha256, virsh_ok,
    wait_output, Pool, PoolHelper, TestEnv,
};

/// The hook's settings file, and the state dir (so the control socket) of the pool-helper daemon
/// the installed hook asks for missing masters.
const HOOK_CONF: &str = "/etc/virt-clone-cow/hook.toml";
const DAEMON_STATE: &str = "/run/vcc-tests-recipesd";

/// The test's pool `vcct-recipes-<test>-<pid>` (removed on drop with its domains, also on
/// failure), after installing the freshly built hook. Its settings only name this test's daemon:
/// the recipes' files are in a pool's directory, which the hook allows by default.
fn env(test: &str) -> TestEnv {
    static SETTINGS: Once = Once::new();
    SETTINGS.call_once(|| {
        std::fs::create_dir_all("/etc/virt-clone-cow").expect("config dir");
        std::fs::write(HOOK_CONF, format!("control_socket = \"{DAEMON_STATE}/control.sock\"\nfetch_timeout = 60\n"))
            .expect("hook settings");
    });
    install_built_hook();
    TestEnv::new(&format!("recipes-{test}"))
}

/// A blank master of 64 MiB in the pool (the guests boot nothing; they run all the same).
fn master(env: &TestEnv, file: &str, format: &str) -> String {
    let p = env.in_pool(file);
    run_ok("qemu-img", &["create", "-q", "-f", format, &p, "64M"]);
    env.refresh_pool();
    p
}

/// Writes `text` to a file in the test's work directory and returns its path (for virsh).
fn work_file(env: &TestEnv, file: &str, text: &str) -> String {
    let f = env.in_work(file);
    std::fs::write(&f, text).expect("write a work file");
    f
}

fn inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat"))
}

/// `qemu-img info --backing-chain` of a running guest's disk: one JSON object per image, the
/// overlay first.
fn backing_chain(path: &str) -> Vec<serde_json::Value> {
    let out = run_ok("qemu-img", &["info", "--force-share", "--backing-chain", "--output=json", path]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info --backing-chain: {e}: {out}"))
}

/// Asserts that `overlay` is a qcow2 image whose one backing file is `master` (of `format`).
fn assert_overlay_of(overlay: &str, master: &str, format: &str) -> Vec<serde_json::Value> {
    let chain = backing_chain(overlay);
    assert_eq!(chain.len(), 2, "overlay and master: {chain:?}");
    assert_eq!(chain[0]["filename"].as_str(), Some(overlay));
    assert_eq!(chain[0]["format"].as_str(), Some("qcow2"));
    assert_eq!(chain[0]["full-backing-filename"].as_str(), Some(master));
    assert_eq!(chain[0]["backing-filename-format"].as_str(), Some(format));
    assert_eq!(chain[1]["filename"].as_str(), Some(master));
    assert_eq!(chain[1]["format"].as_str(), Some(format));
    chain
}

/// The source of the running domain's disk vda (`virsh domblklist`).
fn vda_source(name: &str) -> String {
    let out = virsh_ok(&["domblklist", name]);
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("vda"))
        .map(|s| s.trim().to_string())
        .next()
        .unwrap_or_else(|| panic!("no vda in domblklist of {name}: {out}"))
}

/// A BIOS guest of 64 MiB without a `<cpu>` element (docs/testing.md); `disk` is its one `<disk>`,
/// `metadata` goes in `<metadata>`.
fn domain_xml(name: &str, disk: &str, metadata: &str) -> String {
    format!(
        "<domain type='{}'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <metadata>{metadata}</metadata>\
         <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><devices>{disk}\
         <console type='pty'/></devices></domain>",
        bios_domain_type(),
        esc(name)
    )
}

fn qcow2_cluster_size(info: &serde_json::Value) -> u64 {
    info["cluster-size"].as_u64().unwrap_or_else(|| panic!("no cluster-size: {info}"))
}

fn extended_l2(info: &serde_json::Value) -> bool {
    info["format-specific"]["data"]["extended-l2"].as_bool().unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Ansible

/// Runs the recipe's playbook as a user would (inventory `localhost,`, connection local), with
/// `vars` as extra variables; bounded.
fn ansible_playbook(env: &TestEnv, vars: &serde_json::Value) -> String {
    let playbook = repo_root().join("docs/recipes/ansible/linked-clone.yml");
    let vars_file = work_file(env, "ansible-vars.json", &vars.to_string());
    let child = Command::new("ansible-playbook")
        .args(["-i", "localhost,", "-c", "local"])
        .arg(&playbook)
        .arg("-e")
        .arg(format!("@{vars_file}"))
        // ansible-core refuses to run unless the locale's encoding is UTF-8 (LC_ALL=C fails).
        .env("LC_ALL", "C.UTF-8")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
        .env("ANSIBLE_LOCAL_TEMP", env.in_work("ansible-tmp"))
        .env("ANSIBLE_REMOTE_TEMP", env.in_work("ansible-tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ansible-playbook runs (apt install ansible: .ci/install-deps)");
    let o = wait_output(child, Duration::from_secs(180));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "ansible-playbook failed ({}):\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The `ok=N changed=N ... failed=N` line of a playbook's recap, as (changed, failed).
fn recap(out: &str) -> (u32, u32) {
    let line = out
        .lines()
        .find(|l| l.starts_with("localhost") && l.contains("changed="))
        .unwrap_or_else(|| panic!("no PLAY RECAP line:\n{out}"));
    let field = |key: &str| -> u32 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    (field("changed="), field("failed="))
}

#[test]
fn the_ansible_playbook_defines_and_starts_a_domain_that_runs_on_an_overlay_the_hook_made() {
    let env = env("ansible");
    let master = master(&env, "debian-12.qcow2", "qcow2");
    let name = env.name("-web-7");
    // The playbook's default: the overlay next to the master, named after the domain.
    let overlay = env.in_pool(&format!("{name}.qcow2"));
    assert!(!Path::new(&overlay).exists());
    let vars = serde_json::json!({
        "vm_name": name,
        "master": master,
        "master_format": "qcow2",
        "domain_type": bios_domain_type(),
        "memory_mib": 64,
        "network": "",
    });

    let out = ansible_playbook(&env, &vars);
    assert_eq!(recap(&out), (2, 0), "defined and started:\n{out}");
    assert_eq!(domstate(&name), "running");
    assert_eq!(vda_source(&name), overlay, "the guest's disk is the overlay");
    let chain = assert_overlay_of(&overlay, &master, "qcow2");
    // Made by the hook (docs/hook.md) in its default layout (hook.toml sets no overlay_layout).
    let layout = vcc_core::layout::OverlayLayout::DEFAULT;
    assert_eq!(qcow2_cluster_size(&chain[0]), layout.cluster_size as u64);
    assert_eq!(extended_l2(&chain[0]), layout.extended_l2, "the hook's default layout: {}", chain[0]);
    assert_eq!(chain[0]["virtual-size"].as_u64(), Some(64 << 20));

    // Run again, as Ansible is: nothing changes, and the overlay (the guest's data) is kept.
    let ino = inode(&overlay);
    let again = ansible_playbook(&env, &vars);
    assert_eq!(recap(&again), (0, 0), "a second run changes nothing:\n{again}");
    assert_eq!(domstate(&name), "running");
    let ino_again = inode(&overlay);
    assert_eq!(ino, ino_again, "the overlay was replaced");
}

#[test]
fn with_a_manifest_the_ansible_playbook_starts_a_clone_on_a_host_without_the_master() {
    let env = env("ansiblefetch");
    // Another host publishes and seeds the master (a pool of its own, a daemon of its own).
    let seed_dir = env.work_dir.join("seed");
    std::fs::create_dir_all(&seed_dir).expect("seed dir");
    std::fs::write(seed_dir.join("debian-12.raw"), random_bytes(8 << 20, 12)).expect("master");
    let seed_pool = Pool::at("recipes-seed", seed_dir, None);
    seed_pool.refresh();
    let mut seeder = PoolHelper::new(&env.work_dir.join("seeder-state"));
    seeder.serve();
    let manifest = seeder.publish(&seed_pool.name, "debian-12.raw");
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("manifest json");
    // This host: the daemon the hook asks, and the test's pool without the master.
    let mut local = PoolHelper::new(Path::new(DAEMON_STATE));
    local.serve();
    let master = env.in_pool("debian-12.raw");
    let name = env.name("-web-8");
    let overlay = env.in_pool(&format!("{name}.qcow2"));

    let vars = serde_json::json!({
        "vm_name": name,
        "master": master,
        "master_format": "raw",
        "master_pool": env.pool,
        "master_manifest": manifest,
        "domain_type": bios_domain_type(),
        "memory_mib": 64,
        "network": "",
    });
    assert!(!Path::new(&master).exists());
    let out = ansible_playbook(&env, &vars);
    assert_eq!(recap(&out), (2, 0), "defined and started:\n{out}");
    assert_eq!(domstate(&name), "running");
    assert_eq!(
        sha256(&master),
        published["sha256"].as_str().expect("sha256"),
        "the fetched master is the published one"
    );
    let chain = assert_overlay_of(&overlay, &master, "raw");
    assert_eq!(chain[0]["virtual-size"].as_u64(), Some(8 << 20));
    let md = virsh_ok(&["metadata", &name, "urn:virt-clone-cow:1"]);
    assert!(md.contains(&format!("manifest=\"{manifest}\"")), "{md}");
    drop(local);
    drop(seeder);
}

// ---------------------------------------------------------------------------------------------
// Terraform (dmacvicar/libvirt): the XML the provider sends, through virsh

/// The storage volume XML the provider sends for a `libvirt_volume` over a base volume (0.9's
/// `backing_store = { path, format }`, the legacy 0.8's `base_volume_id`): libvirt makes the
/// overlay at `terraform apply`.
fn overlay_volume_xml(name: &str, capacity: u64, master: &str, format: &str) -> String {
    format!(
        "<volume type='file'><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <target><format type='qcow2'/></target>\
         <backingStore><path>{}</path><format type='{format}'/></backingStore></volume>",
        esc(name),
        esc(master)
    )
}

#[test]
fn a_terraform_volume_over_a_base_volume_runs_with_the_hook_installed_and_the_hook_leaves_it_alone() {
    let env = env("tfvol");
    let master = master(&env, "base.raw", "raw");
    let vol = "web-7.qcow2";
    let overlay = env.in_pool(vol);
    // `terraform apply`: libvirt_volume.overlay (the provider's StorageVolCreateXML).
    let f = work_file(&env, "volume.xml", &overlay_volume_xml(vol, 64 << 20, &master, "raw"));
    virsh_ok(&["vol-create", &env.pool, &f]);
    let made = assert_overlay_of(&overlay, &master, "raw");
    // libvirt made it with qemu-img's defaults (64 KiB clusters, no extended L2).
    assert_eq!(qcow2_cluster_size(&made[0]), 64 << 10);
    assert!(!extended_l2(&made[0]), "{}", made[0]);
    let ino = inode(&overlay);

    // libvirt_domain with `source = { volume = { pool, volume } }` (0.9; the legacy provider
    // writes a file disk with the volume's path).
    let name = env.name("-web-7");
    let disk = format!(
        "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
         <source pool='{}' volume='{vol}'/><target dev='vda' bus='virtio'/></disk>",
        esc(&env.pool)
    );
    let f = work_file(&env, "domain.xml", &domain_xml(&name, &disk, ""));
    virsh_ok(&["define", &f]);
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(vda_source(&name), vol, "the guest's disk is the volume");
    assert_eq!(virsh_ok(&["vol-path", "--pool", &env.pool, vol]).trim(), overlay);
    assert_overlay_of(&overlay, &master, "raw");
    let ino_after = inode(&overlay);
    assert_eq!(ino, ino_after, "the hook replaced an overlay it did not make");
}

#[test]
fn a_terraform_domain_whose_disk_has_a_backing_store_starts_on_an_overlay_the_hook_made() {
    let env = env("tfdom");
    let master = master(&env, "base.qcow2", "qcow2");
    let overlay = env.in_pool("web-8.qcow2");
    let name = env.name("-web-8");
    // libvirt_domain with `source = { file = { file = overlay } }` and
    // `backing_store = { format = { type = "qcow2" }, source = { file = { file = master } } }`,
    // and the metadata block docs/recipes/terraform/main.tf writes (without a manifest: the
    // master is here).
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <backingStore type='file'><format type='qcow2'/><source file='{}'/></backingStore>\
         <target dev='vda' bus='virtio'/></disk>",
        esc(&overlay),
        esc(&master)
    );
    let metadata = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='base' disposable='no'>\
         <vcc:disk target='vda' overlay='{}'><vcc:master path='{}' format='qcow2'/></vcc:disk>\
         </vcc:clone></vcc:cow>",
        esc(&overlay),
        esc(&master)
    );
    let f = work_file(&env, "domain.xml", &domain_xml(&name, &disk, &metadata));
    virsh_ok(&["define", &f]);
    assert!(!Path::new(&overlay).exists(), "terraform apply makes no volume here");
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(vda_source(&name), overlay);
    let chain = assert_overlay_of(&overlay, &master, "qcow2");
    let layout = vcc_core::layout::OverlayLayout::DEFAULT;
    assert_eq!(qcow2_cluster_size(&chain[0]), layout.cluster_size as u64);
    assert_eq!(extended_l2(&chain[0]), layout.extended_l2, "made by the hook: {}", chain[0]);
    // The metadata is libvirt's to keep: `virsh metadata` reads it back for our tools.
    let md = virsh_ok(&["metadata", &name, "urn:virt-clone-cow:1"]);
    assert!(md.contains(&format!("overlay=\"{overlay}\"")), "{md}");
}

// ---------------------------------------------------------------------------------------------
// virt-manager: the volume dialog's "backing store", as virsh does it

#[test]
fn a_volume_made_with_vol_create_as_backing_vol_runs_as_a_linked_clone() {
    let env = env("virtmgr");
    let master = master(&env, "template.raw", "raw");
    // What virt-manager's "Create storage volume" dialog does with "Backing store" filled in.
    virsh_ok(&[
        "vol-create-as",
        &env.pool,
        "web-9.qcow2",
        "64M",
        "--format",
        "qcow2",
        "--backing-vol",
        &master,
        "--backing-vol-format",
        "raw",
    ]);
    let overlay = env.in_pool("web-9.qcow2");
    assert_overlay_of(&overlay, &master, "raw");
    let vols = virsh_ok(&["vol-list", &env.pool]);
    assert!(vols.contains("web-9.qcow2") && vols.contains("template.raw"), "{vols}");

    // The new VM wizard's "Select or create custom storage": a file disk on the volume's path.
    let name = env.name("-web-9");
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/></disk>",
        esc(&overlay)
    );
    let f = work_file(&env, "domain.xml", &domain_xml(&name, &disk, ""));
    virsh_ok(&["define", &f]);
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(vda_source(&name), overlay);
    assert_overlay_of(&overlay, &master, "raw");
}
