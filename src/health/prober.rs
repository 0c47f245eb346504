//! The prober task.
