//! The serde schema: a config as written, every value kept loose (`Scalar`, `Loose`) so
//! that a wrong type is one reported problem among others, not an abort. `validate/`
//! turns it into the model.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, IgnoredAny};
use serde::Deserialize;

/// A scalar as written, kept loose so a wrong type is one reported problem among others
/// rather than an abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    Text(String),
    Int(i128),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other("a float"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other("a boolean"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a table"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value of the expected shape, or what was found instead (so a wrong type is one
/// reported problem naming its field, not a parse error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Loose<T> {
    Ok(T),
    Found(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        let found = match &value {
            toml::Value::String(_) => "a string",
            toml::Value::Integer(_) => "an integer",
            toml::Value::Float(_) => "a float",
            toml::Value::Boolean(_) => "a boolean",
            toml::Value::Datetime(_) => "a date",
            toml::Value::Array(_) => "an array",
            toml::Value::Table(_) => "a table",
        };
        Ok(T::deserialize(value).map_or(Loose::Found(found), Loose::Ok))
    }
}

fn deserialize_tools<'de, D: de::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<(String, Scalar)>>, D::Error> {
    let map = Option::<BTreeMap<String, Scalar>>::deserialize(d)?;
    Ok(map.map(|m| m.into_iter().collect()))
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Raw {
    pub(crate) by_user: Option<Scalar>,
    pub(crate) by_tenant: Option<Scalar>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_tool: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_prompt: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_user_tool: Option<Vec<(String, Scalar)>>,
    pub(crate) tiers: Option<BTreeMap<String, RawTier>>,
    pub(crate) tenants: Option<BTreeMap<String, Scalar>>,
    pub(crate) anonymous: Option<Scalar>,
    pub(crate) algorithm: Option<Scalar>,
    pub(crate) mode: Option<Scalar>,
    pub(crate) fail_mode: Option<Scalar>,
    pub(crate) headers: Option<Scalar>,
    pub(crate) identity: RawIdentity,
    pub(crate) mcp: Option<RawMcp>,
    pub(crate) cost: Option<RawCost>,
    pub(crate) backend: RawBackend,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawCost {
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) tools: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) prompts: Option<Vec<(String, Scalar)>>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawMcp {
    pub(crate) refusal: Option<Scalar>,
    pub(crate) max_body: Option<Scalar>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawTier {
    pub(crate) by_user: Option<Scalar>,
    pub(crate) by_tenant: Option<Scalar>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_tool: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_user_tool: Option<Vec<(String, Scalar)>>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawIdentity {
    pub(crate) user_header: Option<Scalar>,
    pub(crate) tenant_header: Option<Scalar>,
    pub(crate) tool_header: Option<Scalar>,
    pub(crate) tool_path: Option<Scalar>,
    pub(crate) cost_header: Option<Scalar>,
    pub(crate) trusted_proxies: Option<Loose<Vec<Scalar>>>,
    pub(crate) ipv6_prefix: Option<Scalar>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawBackend {
    pub(crate) kind: Option<Scalar>,
    pub(crate) url: Option<Scalar>,
    pub(crate) urls: Option<Loose<Vec<Scalar>>>,
    pub(crate) tls_ca: Option<Scalar>,
    pub(crate) tls_insecure: Option<Loose<bool>>,
    pub(crate) key_prefix: Option<Scalar>,
    pub(crate) pool_size: Option<Scalar>,
    pub(crate) timeout_ms: Option<Scalar>,
    pub(crate) fallback: Option<Scalar>,
    pub(crate) max_keys: Option<Scalar>,
    pub(crate) deny_cache: Option<Scalar>,
    pub(crate) max_batch: Option<Scalar>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, IgnoredAny>,
}
