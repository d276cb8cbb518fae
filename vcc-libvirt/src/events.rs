//! libvirt's domain lifecycle events, for the pool-helper daemon: a domain defined on this host is
//! reported at once, so its missing masters can be fetched before anyone starts it.
//!
//! libvirt delivers events through an event loop that some thread must run
//! (`virEventRegisterDefaultImpl`, then `virEventRunDefaultImpl` in a loop). [`watch_defined`]
//! is that thread's body: it opens its own connection with keepalive (a libvirtd that dies or
//! hangs closes the connection within about `interval * (count + 1)` seconds), registers for
//! `LIFECYCLE` events and runs the loop until the connection is closed, calling back for every
//! `DEFINED` event with the domain's name. The caller reconnects (and should look at every domain
//! again, since events were missed meanwhile).
//!
//! The `virt` crate has no wrapper for domain event callbacks, so they are registered through
//! `virt::sys`; every unsafe block says why it is sound.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use virt::connect::Connect;
use virt::sys;

use crate::{LibvirtError, VirtError};

/// Keepalive: a probe every `interval` seconds; the connection is closed after `count` unanswered.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: i32,
    pub count: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { interval: 5, count: 3 }
    }
}

/// What the lifecycle callback needs: the caller's function.
struct Watch {
    on_defined: Box<dyn FnMut(&str) + Send>,
}

/// Registers libvirt's default event loop once per process (it must be registered before the
/// connections that want events are opened).
fn register_event_loop() -> Result<(), LibvirtError> {
    static REGISTERED: OnceLock<Result<(), VirtError>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| virt::event::event_register_default_impl().map_err(VirtError::from))
        .clone()
        .map_err(|source| LibvirtError::Call { op: "registering libvirt's event loop".into(), source })
}

/// Runs libvirt's event loop on this thread, calling `on_defined(domain name)` for every domain
/// defined (or redefined) on `uri`, until the connection closes: returns `Ok(())` then (libvirtd
/// stopped, or stopped answering keepalives). An error if the connection or the registration
/// fails. Only one thread in the process may run this at a time (libvirt's event loop is global).
pub fn watch_defined(
    uri: Option<&str>,
    keepalive: Keepalive,
    on_defined: impl FnMut(&str) + Send + 'static,
) -> Result<(), LibvirtError> {
    register_event_loop()?;
    virt::error::clear_error_callback();
    let conn = Connect::open(uri).map_err(|source| LibvirtError::Connect {
        uri: uri.unwrap_or("(default)").to_string(),
        source: source.into(),
    })?;
    conn.set_keep_alive(keepalive.interval, keepalive.count)
        .map_err(crate::call("turning on keepalive on the event connection"))?;

    let closed = Arc::new(AtomicBool::new(false));
    let close_flag = Arc::into_raw(Arc::clone(&closed)) as *mut c_void;
    // SAFETY: `conn` is open; `on_close` matches virConnectCloseFunc; the opaque pointer is an
    // `Arc<AtomicBool>` reference that `free_close_flag` releases exactly once, when libvirt drops
    // the callback (unregistered below, or with the connection).
    let r = unsafe {
        sys::virConnectRegisterCloseCallback(conn.as_ptr(), Some(on_close), close_flag, Some(free_close_flag))
    };
    if r < 0 {
        // SAFETY: libvirt did not take the pointer; it is ours to release.
        unsafe { drop(Arc::from_raw(close_flag as *const AtomicBool)) };
        return Err(crate::call("watching the event connection for its close")(virt::error::Error::last_error()));
    }

    let watch = Box::into_raw(Box::new(Watch { on_defined: Box::new(on_defined) })) as *mut c_void;
    // SAFETY: libvirt calls a generic callback with the arguments of the event's own type; for
    // LIFECYCLE that is virConnectDomainEventCallback, which `on_lifecycle` is (the C API's
    // VIR_DOMAIN_EVENT_CALLBACK cast does the same). `watch` is a `Box<Watch>` that `free_watch`
    // releases exactly once, when the registration ends.
    let id = unsafe {
        let cb: sys::virConnectDomainEventGenericCallback = Some(std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(on_lifecycle));
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            watch,
            Some(free_watch),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take the pointer; it is ours to release.
        unsafe { drop(Box::from_raw(watch as *mut Watch)) };
        return Err(crate::call("registering for domain lifecycle events")(virt::error::Error::last_error()));
    }
    tracing::info!("watching libvirt's domain lifecycle events");

    let mut result = Ok(());
    while !closed.load(Ordering::SeqCst) {
        if let Err(e) = virt::event::event_run_default_impl() {
            result = Err(crate::call("running libvirt's event loop")(e));
            break;
        }
    }
    // SAFETY: `id` is the registration made above on this open connection. On a closed connection
    // these fail harmlessly; libvirt frees the callbacks' data with the connection.
    unsafe {
        sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id);
        sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(on_close));
    }
    result
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    if event != sys::VIR_DOMAIN_EVENT_DEFINED as c_int || opaque.is_null() {
        return 0;
    }
    // SAFETY: `dom` is valid for the duration of the callback; the name it returns lives as long.
    let name = unsafe {
        let p = sys::virDomainGetName(dom);
        if p.is_null() {
            return 0;
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    // SAFETY: `opaque` is the `Box<Watch>` registered with this callback, alive until `free_watch`;
    // callbacks run on the event loop's one thread, so nothing else touches it meanwhile.
    let watch = unsafe { &mut *(opaque as *mut Watch) };
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (watch.on_defined)(&name)));
    0
}

unsafe extern "C" fn free_watch(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: the pointer came from `Box::into_raw` in `watch_defined`; libvirt frees it once.
        drop(unsafe { Box::from_raw(opaque as *mut Watch) });
    }
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, _reason: c_int, opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` is the `Arc<AtomicBool>` registered with this callback, alive until
        // `free_close_flag`.
        unsafe { &*(opaque as *const AtomicBool) }.store(true, Ordering::SeqCst);
    }
}

unsafe extern "C" fn free_close_flag(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: the pointer came from `Arc::into_raw` in `watch_defined`; libvirt frees it once.
        drop(unsafe { Arc::from_raw(opaque as *const AtomicBool) });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_libvirtd_that_is_not_there_is_an_error_at_once_not_a_wait() {
        let uri = "qemu+unix:///system?socket=/nonexistent-vcc-events/libvirt-sock";
        let t0 = std::time::Instant::now();
        let e = watch_defined(Some(uri), Keepalive::default(), |_| {}).unwrap_err();
        assert!(matches!(e, LibvirtError::Connect { .. }), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t0.elapsed());
        // The event loop is registered once; a second try registers nothing again and fails alike.
        assert!(matches!(watch_defined(Some(uri), Keepalive::default(), |_| {}), Err(LibvirtError::Connect { .. })));
    }
}
