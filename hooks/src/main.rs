//! The libvirt hook (`/etc/libvirt/hooks/qemu.d/50-virt-clone-cow`, and the same binary as
//! `/etc/libvirt/hooks/libxl.d/50-virt-clone-cow` for Xen through libvirt's libxl driver).
//!
//! libvirt runs it as `HOOK DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain XML on stdin.
//! Exit 0 is success (and the answer for every domain we do not manage, and for every operation
//! other than `prepare`/`migrate`/`restore begin`); anything else makes libvirt fail the operation
//! and show our stderr to the user. The logic is in the library (`vcc_hook::main_with`).

use std::process::ExitCode;

fn main() -> ExitCode {
    // Arguments converted lossily: a domain name that is not UTF-8 must not make us panic.
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let code = vcc_hook::main_with(
        &args,
        &mut std::io::stdin().lock(),
        &vcc_hook::config::Config::load_default,
        &mut std::io::stderr(),
    );
    ExitCode::from(code)
}
