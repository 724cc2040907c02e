//! What to limit and how: the public model (`model`), every setting's default and range
//! (`settings`), the serde schema (`schema`), the checks that turn one into the other
//! (`check`, and `validate/`, one checker per section), the builder, and the error that
//! lists every problem. A config that exists is valid: deserializing,
//! `RateLimitConfig::from_toml_str` and `RateLimitConfigBuilder::build` all run the same
//! validation.

mod builder;
mod check;
mod error;
mod model;
mod schema;
pub(crate) mod settings;
mod validate;

pub use builder::{RateLimitConfigBuilder, RateSpec};
pub use error::ConfigError;
pub use model::{
    Anonymous, BackendConfig, BackendKind, CostConfig, FailMode, Fallback, HeaderStyle,
    IdentityConfig, McpConfig, Mode, RateLimitConfig, Refusal, TierConfig,
};
#[cfg(test)]
pub(crate) use validate::canonical;
#[cfg(feature = "redis")]
pub(crate) use validate::check_url;
