//! Configuration: every mistake is reported at start-up, each naming its field.

use tollgate::{Mode, Rate, RateLimitConfig};

fn problems(toml: &str) -> Vec<String> {
    match RateLimitConfig::from_toml_str(toml) {
        Ok(cfg) => panic!("accepted {toml:?}: {cfg:?}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[test]
fn bad_rates_are_rejected_naming_the_field() {
    for bad in ["abc/m", "0/m", "-5/m", "60", "", "/", "10/w", "10/0s"] {
        let lines = problems(&format!("by_user = {bad:?}"));
        assert_eq!(lines.len(), 1, "{bad:?}: {lines:?}");
        assert!(
            lines[0].starts_with(&format!("by_user: invalid rate {bad:?}: ")),
            "{lines:?}"
        );
    }
    let lines = problems("by_tenant = 60");
    assert_eq!(
        lines,
        ["by_tenant: expected a rate like \"60/m\", found the bare number 60"]
    );
}

#[test]
fn a_bad_rate_inside_by_tool_names_the_tool() {
    let lines = problems("[by_tool]\nsearch = \"abc/m\"\nfetch = \"5/m\"");
    assert_eq!(
        lines,
        ["by_tool[\"search\"]: invalid rate \"abc/m\": count must be a positive integer no larger than 1000000000"]
    );
}

#[test]
fn unknown_choices_are_rejected() {
    for (toml, field, word) in [
        ("algorithm = \"leaky\"", "algorithm", "leaky"),
        ("mode = \"strict\"", "mode", "strict"),
        ("fail_mode = \"maybe\"", "fail_mode", "maybe"),
        ("headers = \"fancy\"", "headers", "fancy"),
        ("[backend]\nkind = \"reddis\"", "backend.kind", "reddis"),
        ("[backend]\nfallback = \"disk\"", "backend.fallback", "disk"),
    ] {
        let lines = problems(toml);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("{field}: unknown ")),
            "{lines:?}"
        );
        assert!(lines[0].contains(&format!("{word:?}")), "{lines:?}");
    }
}

#[test]
fn duplicate_tools_after_normalisation_are_rejected() {
    let lines = problems("[by_tool]\nSearch = \"1/m\"\n\" search \" = \"2/m\"");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("same tool"), "{lines:?}");
    assert_eq!(
        problems("[by_tool]\n\" \" = \"1/m\""),
        ["by_tool[\" \"]: tool name is empty"]
    );
}

#[test]
fn redis_without_url_is_rejected() {
    let lines = problems("[backend]\nkind = \"redis\"");
    assert!(
        lines.contains(&"backend.url: required when backend.kind = \"redis\"".to_owned()),
        "{lines:?}"
    );
    let lines = problems("[backend]\nkind = \"redis\"\nurl = \"http://x\"");
    assert!(
        lines[0].starts_with("backend.url: must start with redis://"),
        "{lines:?}"
    );
}

#[test]
fn three_mistakes_are_all_reported() {
    let lines =
        problems("by_user = \"abc/m\"\nalgorithm = \"leaky\"\n[backend]\nkind = \"reddis\"");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("by_user: "));
    assert!(lines[1].starts_with("algorithm: "));
    assert!(lines[2].starts_with("backend.kind: "));
}

#[test]
fn other_fields_are_checked_too() {
    let lines = problems(
        "byuser = \"1/m\"\n[identity]\nuser_header = \"x user\"\nfoo = 1\n[backend]\npool_size = 0\ntimeout_ms = \"fast\"\nmax_keys = -1\nkey_prefix = \"a b\"",
    );
    for expected in [
        "byuser: unknown field",
        "identity.user_header: \"x user\" is not a valid HTTP header name",
        "identity.foo: unknown field",
        "backend.pool_size: 0 is out of range: must be 1 to 1024",
        "backend.timeout_ms: expected an integer, found a string",
        "backend.max_keys: -1 is out of range",
        "backend.key_prefix: must be",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "{expected} not in {lines:?}"
        );
    }
    assert_eq!(lines.len(), 7, "{lines:?}");
}

#[test]
fn sliding_window_refuses_rates_it_cannot_compute_exactly() {
    let lines = problems("algorithm = \"sliding_window\"\nby_user = \"1000000000/d\"");
    assert!(
        lines[0].starts_with("by_user: rate \"1000000000/d\" is too large for sliding_window"),
        "{lines:?}"
    );
    assert!(RateLimitConfig::from_toml_str("by_user = \"1000000000/d\"").is_ok());
}

#[test]
fn toml_syntax_errors_are_reported() {
    let lines = problems("by_user = ");
    assert!(lines[0].starts_with("toml: "), "{lines:?}");
}

#[cfg(not(feature = "redis"))]
#[test]
fn redis_needs_the_redis_feature() {
    let lines = problems("[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/\"");
    assert_eq!(
        lines,
        ["backend.kind: \"redis\" needs tollgate built with its `redis` feature"]
    );
}

#[cfg(feature = "redis")]
#[test]
fn a_full_config_reads_as_documented() {
    use std::time::Duration;
    use tollgate::{Algorithm, BackendKind, FailMode, Fallback, HeaderStyle};
    let cfg = RateLimitConfig::from_toml_str(
        r#"
        by_user   = "30/m"
        by_tenant = "3000/m"
        algorithm = "token_bucket"
        mode      = "permissive"
        fail_mode = "closed"
        headers   = "both"
        [by_tool]
        Search = "10/m"
        [identity]
        user_header   = "x-user-id"
        tenant_header = "x-tenant-id"
        tool_header   = "x-tool-name"
        [backend]
        kind       = "redis"
        url        = "redis://127.0.0.1:6379/0"
        key_prefix = "gw"
        pool_size  = 4
        timeout_ms = 20
        fallback   = "none"
        max_keys   = 5000
        deny_cache = 0
    "#,
    )
    .unwrap();
    assert_eq!(cfg.by_user(), Some(Rate::per_minute(30)));
    assert_eq!(cfg.by_tenant(), Some(Rate::per_minute(3000)));
    assert_eq!(
        cfg.by_tool().collect::<Vec<_>>(),
        [("search", Rate::per_minute(10))]
    );
    assert_eq!(cfg.algorithm(), Algorithm::TokenBucket);
    assert_eq!(cfg.mode(), Mode::Permissive);
    assert_eq!(cfg.fail_mode(), FailMode::Closed);
    assert_eq!(cfg.headers(), HeaderStyle::Both);
    assert_eq!(cfg.identity().tool_header().unwrap(), "x-tool-name");
    let b = cfg.backend();
    assert_eq!(b.kind(), BackendKind::Redis);
    assert_eq!(b.url(), Some("redis://127.0.0.1:6379/0"));
    assert_eq!(
        (b.key_prefix(), b.pool_size(), b.timeout()),
        ("gw", 4, Duration::from_millis(20))
    );
    assert_eq!(
        (b.fallback(), b.max_keys(), b.deny_cache()),
        (Fallback::None, 5000, 0)
    );
    assert!(
        !format!("{cfg:?}").contains("6379"),
        "Debug hides the URL (it may hold a password)"
    );
}

#[test]
fn defaults_and_builder_agree_with_files() {
    let built = RateLimitConfig::builder()
        .by_user(Rate::per_minute(30))
        .by_tenant("3000/m")
        .tool(" Search", "10/m")
        .build()
        .unwrap();
    let parsed = RateLimitConfig::from_toml_str(
        "by_user = \"30/m\"\nby_tenant = \"3000/m\"\n[by_tool]\nsearch = \"10/m\"",
    )
    .unwrap();
    assert_eq!(built, parsed);
    let err = RateLimitConfig::builder()
        .by_user("0/m")
        .tool("a", "x")
        .build()
        .unwrap_err();
    assert_eq!(err.problems().count(), 2);
    let d = RateLimitConfig::default();
    assert_eq!(
        (d.by_user(), d.mode(), d.backend().max_keys()),
        (None, Mode::Enforce, 1_000_000)
    );
}

#[test]
fn serde_deserialization_validates_too() {
    let err = toml::from_str::<RateLimitConfig>("by_user = \"0/m\"\nmode = \"x\"").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("by_user: invalid rate") && text.contains("mode: unknown mode"),
        "{text}"
    );
    let json: RateLimitConfig = serde_json::from_str(r#"{"by_user": "5/s"}"#).unwrap();
    assert_eq!(json.by_user(), Some(Rate::per_second(5)));
}

/// Where Redis is and how it is reached is checked at start-up: a URL this build or this
/// kind of store cannot serve names its field (it used to pass and leave a store that
/// never called Redis).
#[cfg(feature = "redis")]
#[test]
fn redis_targets_are_checked_at_start_up_each_naming_its_field() {
    let cases = [
        (
            "kind = \"redis\"\nurl = \"redis://[::1\"",
            "backend.url: the redis URL is invalid",
        ),
        (
            "kind = \"redis\"\nurl = \"http://x\"",
            "backend.url: must start with redis://",
        ),
        (
            "kind = \"redis\"\nurl = \"redis://a:6379\"\nurls = [\"redis://b:6379\"]",
            "backend.urls: only for backend.kind = \"redis_cluster\"",
        ),
        (
            "kind = \"redis_cluster\"",
            "backend.urls: required when backend.kind = \"redis_cluster\"",
        ),
        (
            "kind = \"redis_cluster\"\nurl = \"redis://a:7000\"\nurls = [\"redis://a:7000\"]",
            "backend.url: a cluster takes its seed nodes in backend.urls",
        ),
        (
            "kind = \"redis_cluster\"\nurls = [\"unix:///tmp/redis.sock\"]",
            "backend.urls[0]: a redis cluster is reached by redis:// or rediss:// URLs",
        ),
        (
            "kind = \"redis_cluster\"\nurls = [\"redis://a:7000\", 7001]",
            "backend.urls[1]: expected a string, found an integer",
        ),
        (
            "kind = \"redis_cluster\"\nurls = \"redis://a:7000\"",
            "backend.urls: expected an array of strings, found a string",
        ),
        (
            "kind = \"redis_cluster\"\nurls = [\"redis://a:7000\", \"rediss://b:7000\"]",
            "backend.urls: mixes rediss:// and redis://",
        ),
    ];
    for (backend, expected) in cases {
        let err = RateLimitConfig::from_toml_str(&format!("[backend]\n{backend}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{backend}:\n{err}");
        assert!(
            err.lines().all(|l| l.starts_with("backend.")),
            "{backend}:\n{err}"
        );
    }
    let cfg = RateLimitConfig::from_toml_str(
        "[backend]\nkind = \"redis_cluster\"\nurls = [\"redis://a:7000\", \"redis://b:7000\"]",
    )
    .unwrap();
    assert_eq!(cfg.backend().urls(), ["redis://a:7000", "redis://b:7000"]);
}

/// A build without TLS refuses `rediss://` at start-up instead of never calling Redis.
#[cfg(all(feature = "redis", not(feature = "redis-tls")))]
#[test]
fn rediss_without_the_tls_feature_is_a_config_error() {
    let err = RateLimitConfig::from_toml_str(
        "[backend]\nkind = \"redis\"\nurl = \"rediss://127.0.0.1:6380\"",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "backend.url: rediss:// needs tollgate built with its `redis-tls` feature"
    );
}

/// Every problem in the new sections is reported at once,
/// each naming its field.
#[test]
fn policy_sections_name_every_problem() {
    let lines = problems(
        r#"
        anonymous = "per_ip"
        [by_user_tool]
        search = "abc/m"
        Fetch = "1/m"
        " fetch" = "2/m"
        [tiers.pro]
        by_user = "0/m"
        by_usr = "5/m"
        [tiers.pro.by_tool]
        search = "many"
        [tiers."bad name"]
        by_tenant = "5/m"
        [tenants]
        acme = "pro"
        globex = "platinum"
        "" = "pro"
        [identity]
        tool_path = "/tools/{tool}"
        ipv6_prefix = 16
        trusted_proxies = ["10.0.0.0/33", "not-an-ip"]
        "#,
    );
    let expected = [
        "by_user_tool[\"search\"]: invalid rate \"abc/m\": count must be a positive integer no larger than 1000000000",
        "by_user_tool[\"Fetch\"]: same tool as by_user_tool[\" fetch\"] after trimming and lower-casing",
        "tiers[\"bad name\"]: a tier name is 1 to 32 letters, digits, '_' or '-'",
        "tiers.pro.by_user: invalid rate \"0/m\": count must be a positive integer no larger than 1000000000",
        "tiers.pro.by_tool[\"search\"]: invalid rate \"many\": ",
        "tenants[\"\"]: tenant id is empty",
        "tenants[\"globex\"]: unknown tier \"platinum\": expected one of pro",
        "anonymous: unknown anonymous bucket \"per_ip\": expected shared or by_ip",
        "identity.tool_path: \"/tools/{tool}\" has no {name} segment",
        "identity.trusted_proxies[0]: \"10.0.0.0/33\" is not an IP address or a CIDR network",
        "identity.trusted_proxies[1]: \"not-an-ip\" is not an IP address or a CIDR network",
        "identity.ipv6_prefix: 16 is out of range: must be 32 to 128",
        "identity.trusted_proxies: only used with anonymous = \"by_ip\"",
        "identity.ipv6_prefix: only used with anonymous = \"by_ip\"",
        "tiers.pro.by_usr: unknown field",
    ];
    for want in expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), expected.len(), "{}", lines.join("\n"));
}

#[test]
fn tool_path_and_tool_header_cannot_both_name_the_tool() {
    let lines = problems("[identity]\ntool_path = \"/tools/{name}\"\ntool_header = \"x-tool\"");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(
            "identity.tool_path: set identity.tool_header or identity.tool_path, not both"
        ),
        "{lines:?}"
    );
    for bad in [
        "tools/{name}",
        "/tools/{name}/{name}",
        "/tools/{*rest}",
        "/to{name}ols",
    ] {
        let lines = problems(&format!("[identity]\ntool_path = {bad:?}"));
        assert!(
            lines.len() == 1 && lines[0].starts_with("identity.tool_path: "),
            "{bad}: {lines:?}"
        );
    }
}

#[test]
fn policy_sections_read_as_documented() {
    let cfg = RateLimitConfig::from_toml_str(
        r#"
        by_user = "60/m"
        anonymous = "by_ip"
        [by_user_tool]
        " Search " = "5/m"
        [tiers.pro]
        by_user = "600/m"
        [tiers.pro.by_tool]
        search = "100/m"
        [tenants]
        " acme " = "pro"
        [identity]
        tool_path = "/v1/{tenant}/tools/{name}"
        trusted_proxies = ["10.0.0.0/8", "::1", "::ffff:192.168.0.0/112"]
        ipv6_prefix = 56
        [backend]
        deny_cache = 5
        "#,
    )
    .unwrap();
    assert_eq!(cfg.anonymous(), tollgate::Anonymous::ByIp);
    assert_eq!(
        cfg.by_user_tool().collect::<Vec<_>>(),
        [("search", Rate::per_minute(5))]
    );
    let pro = cfg.tier("pro").unwrap();
    assert_eq!(pro.by_user(), Some(Rate::per_minute(600)));
    assert_eq!(pro.by_tenant(), None, "inherited");
    assert_eq!(
        pro.by_tool().collect::<Vec<_>>(),
        [("search", Rate::per_minute(100))]
    );
    assert_eq!(cfg.tenants().collect::<Vec<_>>(), [("acme", "pro")]);
    let id = cfg.identity();
    assert_eq!(id.tool_path(), Some("/v1/{tenant}/tools/{name}"));
    assert_eq!(id.ipv6_prefix(), 56);
    let nets: Vec<String> = id
        .trusted_proxies()
        .map(|(addr, len)| format!("{addr}/{len}"))
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.168.0.0/16"]);
    assert_eq!(cfg.backend().deny_cache(), 5, "1 to 15 are honoured too");

    let built = RateLimitConfig::builder()
        .by_user("60/m")
        .anonymous(tollgate::Anonymous::ByIp)
        .user_tool(" Search ", "5/m")
        .tier_by_user("pro", "600/m")
        .tier_tool("pro", "search", "100/m")
        .tenant_tier(" acme ", "pro")
        .tool_path("/v1/{tenant}/tools/{name}")
        .trusted_proxies(["10.0.0.0/8", "::1", "::ffff:192.168.0.0/112"])
        .ipv6_prefix(56)
        .deny_cache(5)
        .build()
        .unwrap();
    assert_eq!(built, cfg);
    let err = RateLimitConfig::builder()
        .tier_by_user("pro", "fast")
        .tenant_tier("acme", "gold")
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiers.pro.by_user: invalid rate \"fast\""),
        "{err}"
    );
    assert!(
        err.contains("tenants[\"acme\"]: unknown tier \"gold\": expected one of pro"),
        "{err}"
    );
}
#[test]
fn mcp_section_and_prompts_are_validated_together() {
    let lines = problems(
        "[by_prompt]\nSummary = \"1/m\"\n\" summary \" = \"2/m\"\nx = \"abc/m\"\n\
         [mcp]\nrefusal = \"teapot\"\nmax_body = \"1GiB\"\nmax_bodi = 5",
    );
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("by_prompt[\"x\"]: invalid rate \"abc/m\"")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("same prompt as by_prompt[")),
        "{lines:?}"
    );
    assert!(lines.contains(
        &"mcp.refusal: unknown refusal \"teapot\": expected tool_error, jsonrpc_error or http"
            .to_owned()
    ));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("mcp.max_body: invalid size \"1GiB\"")),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"mcp.max_bodi: unknown field".to_owned()),
        "{lines:?}"
    );
    assert_eq!(
        problems("[mcp]\nmax_body = 0"),
        ["mcp.max_body: 0 bytes is out of range: must be 1 byte to 64 MiB"]
    );
    assert_eq!(
        problems("[mcp]\nmax_body = \"65MiB\""),
        ["mcp.max_body: 68157440 bytes is out of range: must be 1 byte to 64 MiB"]
    );
    assert_eq!(
        problems("[mcp]\nmax_body = true"),
        ["mcp.max_body: expected a size like \"1MiB\", found a boolean"]
    );
}

#[test]
fn mcp_section_defaults_and_sizes() {
    use tollgate::Refusal;
    let cfg = RateLimitConfig::from_toml_str("").unwrap();
    assert!(cfg.mcp().is_none());
    let cfg = RateLimitConfig::from_toml_str("[mcp]").unwrap();
    let mcp = cfg.mcp().unwrap();
    assert_eq!(
        (mcp.refusal(), mcp.max_body()),
        (Refusal::ToolError, 1 << 20)
    );
    for (text, bytes) in [
        ("\"1MiB\"", 1 << 20),
        ("\"512 KiB\"", 512 << 10),
        ("\"64kb\"", 64 << 10),
        ("\"100\"", 100),
        ("100", 100),
        ("\"2 MB\"", 2 << 20),
    ] {
        let cfg = RateLimitConfig::from_toml_str(&format!("[mcp]\nmax_body = {text}")).unwrap();
        assert_eq!(cfg.mcp().unwrap().max_body(), bytes, "{text}");
    }
    let cfg = RateLimitConfig::from_toml_str(
        "[by_prompt]\n\" Summary \" = \"3/m\"\n[mcp]\nrefusal = \"JSONRPC_error\"",
    )
    .unwrap();
    assert_eq!(cfg.prompt_rate("summary"), Some(Rate::per_minute(3)));
    assert_eq!(cfg.tool_rate("summary"), None);
    assert_eq!(cfg.mcp().unwrap().refusal(), Refusal::JsonRpcError);
    let built = RateLimitConfig::builder()
        .prompt(" Summary ", "3/m")
        .mcp_refusal(Refusal::JsonRpcError)
        .build()
        .unwrap();
    assert_eq!(built, cfg);
}

#[test]
fn cost_tables_name_every_bad_entry() {
    let lines = problems(
        "[cost.tools]\nsearch = -1\nfetch = \"ten\"\nbig = 1000000001\nfree = 0\n\
         \" Search \" = 3\nflag = true\n[cost.prompts]\n\"\" = 1\n[cost]\nextra = 1",
    );
    assert_eq!(
        lines,
        [
            "cost.tools[\"big\"]: 1000000001 is out of range: a cost is 0 to 1000000000 units",
            "cost.tools[\"fetch\"]: expected a number of units, found a string",
            "cost.tools[\"flag\"]: expected a number of units, found a boolean",
            "cost.tools[\"search\"]: -1 is out of range: a cost is 0 to 1000000000 units",
            "cost.tools[\"search\"]: same tool as cost.tools[\" Search \"] after trimming and lower-casing",
            "cost.prompts[\"\"]: prompt name is empty",
            "cost.extra: unknown field",
        ]
    );
    assert_eq!(
        problems("[identity]\ncost_header = \"x-cost\""),
        ["identity.cost_header: only used with a [cost] section (which turns budgets in units on)"]
    );
    assert_eq!(
        problems("[cost]\n[identity]\ncost_header = \"bad header\""),
        ["identity.cost_header: \"bad header\" is not a valid HTTP header name"]
    );
}

#[test]
fn cost_tables_read_as_documented() {
    let cfg = RateLimitConfig::from_toml_str(
        "by_user = \"100000/h\"\n[cost.tools]\nSearch = 10\nsummarise = 500\n\
         [cost.prompts]\nsummary = 5\n[identity]\ncost_header = \"x-cost\"",
    )
    .unwrap();
    let cost = cfg.cost().expect("[cost] is on");
    assert_eq!(
        cost.tools().collect::<Vec<_>>(),
        [("search", 10), ("summarise", 500)]
    );
    assert_eq!(cost.prompts().collect::<Vec<_>>(), [("summary", 5)]);
    assert_eq!(
        cfg.identity().cost_header().map(|h| h.as_str()),
        Some("x-cost")
    );
    // Without a [cost] section every call costs 1.
    assert!(RateLimitConfig::from_toml_str("by_user = \"1/m\"")
        .unwrap()
        .cost()
        .is_none());
}

#[test]
fn a_table_of_the_wrong_shape_is_reported_under_its_field() {
    for (toml, want) in [
        (
            "cost = 5",
            "cost: invalid type: integer `5`, expected a table (line 1)",
        ),
        (
            "[cost]\ntools = 5",
            "cost.tools: invalid type: integer `5`, expected a table (line 2)",
        ),
        (
            "by_tool = 5",
            "by_tool: invalid type: integer `5`, expected a table (line 1)",
        ),
        (
            "[tiers]\ngold = 3",
            "tiers.gold: invalid type: integer `3`, expected a table (line 2)",
        ),
        (
            "identity = \"x\"",
            "identity: invalid type: string \"x\", expected a table (line 1)",
        ),
    ] {
        assert_eq!(problems(toml), [want], "{toml:?}");
    }
    assert_eq!(
        problems("by_user = \"1/m\"\nby_user = \"2/m\""),
        ["toml: line 2: duplicate key"]
    );
}
