//! The libvirt qemu hook (`/etc/libvirt/hooks/qemu.d/50-virt-clone-cow`).
//!
//! libvirt runs it as `HOOK DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain XML on stdin.
//! Exit 0 is success (and the answer for every domain we do not manage); anything else makes
//! libvirt fail the operation and show our stderr to the user.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(inv) = vcc_hook::Invocation::from_args(&args) else {
        eprintln!("virt-clone-cow-hook: run by libvirt as `HOOK DOMAIN OPERATION SUB-OPERATION EXTRA`; install it with packaging/hook-install");
        return ExitCode::from(2);
    };
    let mut xml = String::new();
    // libvirt always writes the XML; cap what we accept so a runaway writer cannot exhaust memory.
    if let Err(e) = std::io::stdin().take(vcc_hook::MAX_XML_BYTES).read_to_string(&mut xml) {
        eprintln!("virt-clone-cow-hook: cannot read the domain XML on stdin: {e}");
        return ExitCode::from(1);
    }
    let cfg = vcc_hook::config::Config::load_default();
    match vcc_hook::run(&inv, &xml, &cfg, &mut std::io::stderr()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virt-clone-cow-hook: {}", vcc_hook::error_line(&e));
            ExitCode::from(1)
        }
    }
}
