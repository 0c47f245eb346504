//! Configuration: the file's types (`types`; the `turn`, `health`, `cluster` and `events`
//! sections in their own files), loading with `${VAR}` expansion and positions (`load`,
//! over the positioned YAML tree of `yaml`), the semantic checks (`validate`) and the key
//! reference (`reference`).

pub mod advice;
pub mod cluster;
pub mod events;
pub mod health;
pub mod load;
pub mod passive;
pub mod reference;
pub mod secret_files;
pub mod turn;
pub mod types;
pub mod validate;
pub mod values;
mod yaml;

#[cfg(test)]
mod tests;

pub use cluster::ClusterConfig;
pub use events::{EventsConfig, WebhookConfig};
pub use health::*;
pub use load::{ConfigError, ConfigErrors, load_file, load_str, load_str_with_env};
pub use passive::{ProtocolSet, authoritative_protocols};
pub use turn::*;
pub use types::*;
pub use validate::{Issue, validate};
