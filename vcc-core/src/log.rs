//! Logging, set up the same way by every program of the project: `tracing` lines on stderr,
//! filtered by [`ENV`] (`VIRT_CLONE_COW_LOG`, `tracing-subscriber` `EnvFilter` syntax, e.g.
//! `debug` or `info,librqbit=warn`) when it is set, else by the `-v` count.
//!
//! ```no_run
//! use vcc_core::log::{init, Setup};
//! let setup = Setup { program: "virt-clone-cow", levels: &["warn", "info", "debug"], deprecated_env: None, targets: false };
//! init(1, &setup); // -v: info, unless VIRT_CLONE_COW_LOG says otherwise
//! ```

use tracing_subscriber::EnvFilter;

/// The one variable that sets the log filter of virt-clone-cow, pool-helper and the hook.
pub const ENV: &str = "VIRT_CLONE_COW_LOG";

/// How a program logs.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// Program name, for the one-line warnings below.
    pub program: &'a str,
    /// Filter for 0, 1, 2, ... `-v`; the last one for any more. Must not be empty.
    pub levels: &'a [&'a str],
    /// A variable still honoured when [`ENV`] is unset, with a one-line deprecation warning
    /// (pool-helper's `RUST_LOG`, for one release).
    pub deprecated_env: Option<&'a str>,
    /// Whether each line names its module (useful where a library, e.g. librqbit, logs too).
    pub targets: bool,
}

/// Where the filter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// [`ENV`] holds these directives.
    Env(String),
    /// Only the deprecated variable `var` is set.
    Deprecated { var: String, directives: String },
    /// Nothing set: the `-v` count chose.
    Verbosity(String),
}

impl Source {
    pub fn directives(&self) -> &str {
        match self {
            Source::Env(d) | Source::Deprecated { directives: d, .. } | Source::Verbosity(d) => d,
        }
    }
}

/// The filter for `verbosity` `-v`s, given how to read a variable (empty values count as unset).
pub fn choose(verbosity: u8, setup: &Setup<'_>, var: impl Fn(&str) -> Option<String>) -> Source {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if let Some(d) = set(ENV) {
        return Source::Env(d);
    }
    if let Some(old) = setup.deprecated_env {
        if let Some(d) = set(old) {
            return Source::Deprecated { var: old.into(), directives: d };
        }
    }
    Source::Verbosity(default_for(verbosity, setup).into())
}

fn default_for<'a>(verbosity: u8, setup: &Setup<'a>) -> &'a str {
    let i = usize::from(verbosity).min(setup.levels.len().saturating_sub(1));
    setup.levels.get(i).copied().unwrap_or("warn")
}

/// Installs the subscriber for the process (once; a second call does nothing). Warnings about a
/// deprecated variable or a filter that does not parse are one line on stderr each.
pub fn init(verbosity: u8, setup: &Setup<'_>) {
    let source = choose(verbosity, setup, |n| std::env::var(n).ok());
    if let Source::Deprecated { var, .. } = &source {
        eprintln!("{}: warning: {var} is deprecated here and will be ignored in a later release; set {ENV} instead (same syntax)", setup.program);
    }
    let filter = match EnvFilter::try_new(source.directives()) {
        Ok(f) => f,
        Err(_) => {
            let fallback = default_for(verbosity, setup);
            eprintln!(
                "{}: warning: cannot read the log filter {:?}; logging at '{fallback}'",
                setup.program,
                source.directives()
            );
            EnvFilter::new(fallback)
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(setup.targets)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETUP: Setup<'static> =
        Setup { program: "p", levels: &["warn", "info", "debug"], deprecated_env: Some("RUST_LOG"), targets: true };

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_variable_wins_over_the_verbosity() {
        assert_eq!(choose(2, &SETUP, env(&[(ENV, "trace")])), Source::Env("trace".into()));
        assert_eq!(choose(0, &SETUP, env(&[(ENV, "info"), ("RUST_LOG", "debug")])), Source::Env("info".into()));
    }

    #[test]
    fn the_deprecated_variable_is_read_only_when_the_new_one_is_unset() {
        let s = choose(0, &SETUP, env(&[("RUST_LOG", "debug")]));
        assert_eq!(s, Source::Deprecated { var: "RUST_LOG".into(), directives: "debug".into() });
        let no_alias = Setup { deprecated_env: None, ..SETUP };
        assert_eq!(choose(0, &no_alias, env(&[("RUST_LOG", "debug")])), Source::Verbosity("warn".into()));
    }

    #[test]
    fn each_v_raises_the_level_up_to_the_last() {
        let levels: Vec<String> = (0..5).map(|v| choose(v, &SETUP, env(&[])).directives().to_string()).collect();
        assert_eq!(levels, ["warn", "info", "debug", "debug", "debug"]);
        assert_eq!(choose(0, &SETUP, env(&[(ENV, " ")])), Source::Verbosity("warn".into()), "blank is unset");
    }
}
