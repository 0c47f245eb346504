//! Configuration: the file's types (`types`), loading with `${VAR}` expansion and
//! positions (`load`), and the semantic checks of SPEC §3 (`validate`).

pub mod load;
pub mod types;
pub mod validate;

pub use load::{load_file, load_str, ConfigError, ConfigErrors};
pub use types::*;
