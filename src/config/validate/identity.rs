//! `anonymous` and `[identity]`: where identities come from, and (with `by_ip`) which
//! proxies' forwarding headers are believed.

use std::net::IpAddr;

use ipnet::IpNet;

use super::super::check::Check;
use super::super::model::{Anonymous, IdentityConfig};
use super::super::schema::{Loose, Raw, Scalar};
use super::super::settings;
use crate::tool_path::ToolPath;

pub(super) fn identity(c: &mut Check, raw: &Raw) -> IdentityConfig {
    let anonymous: Anonymous = c.choice("anonymous", &raw.anonymous);
    let ri = &raw.identity;
    let tool_header = c.header("identity.tool_header", &ri.tool_header);
    let tool_path =
        c.text("identity.tool_path", &ri.tool_path)
            .and_then(|p| match ToolPath::parse(p) {
                Ok(path) => Some(path),
                Err(problem) => {
                    c.err.push("identity.tool_path", problem);
                    None
                }
            });
    if tool_path.is_some() && tool_header.is_some() {
        c.err.push(
            "identity.tool_path",
            "set identity.tool_header or identity.tool_path, not both (a client could name another tool in the header than the one its path calls)",
        );
    }
    let trusted_proxies = networks(c, "identity.trusted_proxies", &ri.trusted_proxies);
    let ipv6_prefix = c.int(&settings::IPV6_PREFIX, &ri.ipv6_prefix) as u8;
    if anonymous != Anonymous::ByIp {
        if ri.trusted_proxies.is_some() {
            c.err.push(
                "identity.trusted_proxies",
                "only used with anonymous = \"by_ip\"",
            );
        }
        if ri.ipv6_prefix.is_some() {
            c.err.push(
                "identity.ipv6_prefix",
                "only used with anonymous = \"by_ip\"",
            );
        }
    }
    IdentityConfig {
        user_header: c.header("identity.user_header", &ri.user_header),
        tenant_header: c.header("identity.tenant_header", &ri.tenant_header),
        tool_header,
        tool_path,
        cost_header: c.header("identity.cost_header", &ri.cost_header),
        trusted_proxies,
        ipv6_prefix,
        anonymous,
    }
}

/// `[identity] trusted_proxies`: CIDR networks or single addresses.
fn networks(c: &mut Check, field: &str, value: &Option<Loose<Vec<Scalar>>>) -> Vec<IpNet> {
    let items = match value {
        None => return Vec::new(),
        Some(Loose::Found(what)) => {
            c.err.push(
                field,
                format!("expected an array of networks like \"10.0.0.0/8\", found {what}"),
            );
            return Vec::new();
        }
        Some(Loose::Ok(items)) => items,
    };
    let mut nets = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let entry = format!("{field}[{i}]");
        let item = Some(item.clone());
        let Some(text) = c.text(&entry, &item) else {
            continue;
        };
        let text = text.trim();
        let net = text
            .parse::<IpNet>()
            .ok()
            .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
        match net {
            // A mapped IPv4 network is the IPv4 network: peers are compared canonically.
            Some(net) => nets.push(canonical(net.trunc())),
            None => c.err.push(
                entry,
                format!("{text:?} is not an IP address or a CIDR network such as \"10.0.0.0/8\" or \"fd00::/8\""),
            ),
        }
    }
    nets
}

/// An IPv4-mapped IPv6 network as the IPv4 network it maps.
pub(crate) fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        net => net,
    }
}
