//! Placeholder: semantic checks of SPEC §3.
