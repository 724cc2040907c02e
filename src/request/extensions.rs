//! What the application tells tollgate about a request, as request extensions: who calls
//! ([`Identity`]), which tool ([`ToolName`]), and on which plan ([`Tier`]). tollgate reads
//! them before any header.

use std::fmt;

/// The caller, as an upstream auth layer established it. Insert it into the request's
/// extensions; tollgate reads it before any header. `Debug` redacts both ids. Build it
/// with [`Identity::new`], [`Identity::user`] or [`Identity::anonymous`] (it may gain
/// fields, so it cannot be written as a struct literal outside tollgate).
///
/// ```
/// use tollgate::Identity;
/// let who = Identity::user("alice").with_tenant("acme");
/// assert_eq!(who.user.as_deref(), Some("alice"));
/// assert_eq!(format!("{who:?}"), "Identity { user: Some(<redacted>), tenant: Some(<redacted>) }");
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Identity {
    /// The user id; `None`, empty or all-whitespace → the shared `anonymous` bucket.
    pub user: Option<String>,
    /// The tenant id; `None` or empty → no tenant rule applies.
    pub tenant: Option<String>,
}

impl Identity {
    /// An identity from what an auth layer found, either part possibly absent (an absent
    /// user is anonymous; an absent tenant applies no tenant rule).
    ///
    /// ```
    /// use tollgate::Identity;
    /// let from_token: Option<String> = None;
    /// let who = Identity::new(from_token, Some("acme".to_owned()));
    /// assert_eq!(who, Identity::anonymous().with_tenant("acme"));
    /// ```
    pub fn new(user: Option<String>, tenant: Option<String>) -> Self {
        Identity { user, tenant }
    }

    /// An identity for `user`, without a tenant.
    pub fn user(user: impl Into<String>) -> Self {
        Identity {
            user: Some(user.into()),
            tenant: None,
        }
    }

    /// An anonymous caller.
    pub fn anonymous() -> Self {
        Identity::default()
    }

    /// The same identity within `tenant`.
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| Redacted);
        f.debug_struct("Identity")
            .field("user", &redact(&self.user))
            .field("tenant", &redact(&self.tenant))
            .finish()
    }
}

struct Redacted;
impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The tool a request calls, as an upstream routing layer established it. Names are
/// trimmed and lower-cased before they are matched against `by_tool`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ToolName(pub String);

impl ToolName {
    /// A tool name.
    pub fn new(name: impl Into<String>) -> Self {
        ToolName(name.into())
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a call costs, in units, as the application knows it before the call (a tool's
/// price, an estimate of the tokens it will use). Insert it into the request's
/// extensions; it wins over `[identity] cost_header` and `[cost.tools]`. Every call costs
/// 1 unit unless told otherwise; 0 is free (always allowed, counted nowhere). The real
/// cost, once known, is settled with the request's [`Charge`](crate::Charge).
///
/// ```
/// use tollgate::Cost;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Cost(40_000));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cost(pub u64);

/// The tier of a request, as the application's plan lookup established it. Insert it into
/// the request's extensions (next to [`Identity`](crate::Identity)); it wins over
/// `[tenants]`. A tier the config does not name counts under the base rules (logged,
/// rate-limited).
///
/// ```
/// use tollgate::{Identity, Tier};
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Identity::user("alice").with_tenant("acme"));
/// req.extensions_mut().insert(Tier::new("pro"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tier(pub String);

impl Tier {
    /// The tier called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Tier(name.into())
    }

    /// The tier's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
