//! The URL and address policy: ranges, registration, the allow list, resolution.

use super::*;

fn allow(entries: &[&str]) -> AllowList {
    AllowList::new(
        entries
            .iter()
            .map(|e| e.parse().expect("allow entry"))
            .collect(),
    )
}

fn range_of(ip: &str) -> Option<String> {
    forbidden(ip.parse().expect("ip")).map(|f| f.to_string())
}

#[test]
fn internal_ranges_are_forbidden_and_public_ones_are_not() {
    for (ip, range) in [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "\"this network\""),
        ("100.64.0.1", "shared (CGNAT)"),
        ("100.127.255.255", "shared (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.200", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fc00::1", "unique local (private)"),
        ("fd12:3456::1", "unique local (private)"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
        ("64:ff9b::a9fe:a9fe", "NAT64 link-local"),
        ("2002:c0a8:0101::1", "6to4 private"),
        ("::10.0.0.1", "IPv4-compatible (deprecated)"),
    ] {
        assert_eq!(range_of(ip).as_deref(), Some(range), "{ip}");
    }
    for ip in [
        "8.8.8.8",
        "1.1.1.1",
        "172.15.255.255",
        "172.32.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "169.253.0.1",
        "192.169.0.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:0808:0808::1",
    ] {
        assert_eq!(range_of(ip), None, "{ip}");
    }
}

#[test]
fn registration_refuses_what_the_policy_forbids() {
    let none = AllowList::default();
    let refused = |url: &str| check_url(url, &none).expect_err(url);
    assert!(matches!(refused("http://10.0.0.1/x"), Refusal::Scheme(s) if s == "http"));
    assert!(matches!(
        refused("http://example.com/x"),
        Refusal::Scheme(_)
    ));
    assert!(matches!(refused("ftp://x"), Refusal::Scheme(s) if s == "ftp"));
    assert!(matches!(
        refused("file:///etc/passwd"),
        Refusal::NoHost | Refusal::Scheme(_)
    ));
    assert!(matches!(refused("not a url"), Refusal::Malformed(_)));
    assert!(matches!(refused(""), Refusal::Malformed(_)));
    assert!(matches!(
        refused("https://user:pw@example.com/"),
        Refusal::Userinfo
    ));
    assert!(matches!(
        refused("https://user@example.com/"),
        Refusal::Userinfo
    ));
    for odd in [
        "HTTPS://example.com/",
        "https:example.com",
        " https://example.com/",
    ] {
        assert_eq!(refused(odd), Refusal::Spelling, "{odd}");
    }
    for (url, range) in [
        ("https://127.0.0.1/x", "loopback"),
        ("https://169.254.169.254/", "link-local"),
        ("https://10.0.0.1/x", "private"),
        ("https://[::1]:8443/x", "loopback"),
        ("https://[fd00::1]/", "unique local (private)"),
        ("https://[::ffff:192.168.0.1]/", "IPv4-mapped private"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://100.64.1.1/", "shared (CGNAT)"),
        ("https://255.255.255.255/", "broadcast"),
        ("https://192.0.2.10/", "documentation"),
        ("https://224.1.1.1/", "multicast"),
        // Spellings of loopback that the URL parser normalizes to 127.0.0.1.
        ("https://2130706433/", "loopback"),
        ("https://0x7f.1/", "loopback"),
        ("https://127.1/", "loopback"),
        ("https://localhost/x", "loopback"),
        ("https://api.LOCALHOST./x", "loopback"),
    ] {
        match refused(url) {
            Refusal::Address { range: r, .. } => assert_eq!(r.to_string(), range, "{url}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    assert!(matches!(
        refused(&format!("https://e.com/{}", "a".repeat(2048))),
        Refusal::TooLong
    ));
    for ok in [
        "https://example.com/hooks",
        "https://8.8.8.8/x",
        "https://[2606:4700:4700::1111]/x",
        "https://hooks.example.com:8443/a?b=c",
    ] {
        check_url(ok, &none).expect(ok);
    }
    let message = refused("https://10.0.0.1/x").to_string();
    assert!(message.contains("private"), "{message}");
}

#[test]
fn the_allow_list_exempts_hosts_and_networks_and_permits_http_for_them() {
    let list = allow(&["127.0.0.1", "hooks.internal", "10.0.0.0/8", "[::1]"]);
    for ok in [
        "https://127.0.0.1/x",
        "http://127.0.0.1:9000/x",
        "http://hooks.internal/x",
        "https://HOOKS.internal./x",
        "http://10.9.8.7/x",
        "http://[::1]:80/",
    ] {
        check_url(ok, &list).expect(ok);
    }
    for refused in [
        "https://127.0.0.2/x",
        "http://example.com/x",
        "https://192.168.0.1/",
        "ftp://127.0.0.1/",
        "http://u:p@127.0.0.1/",
    ] {
        assert!(check_url(refused, &list).is_err(), "{refused}");
    }
    assert!("bad host".parse::<AllowEntry>().is_err());
    assert!("".parse::<AllowEntry>().is_err());
    assert_eq!(
        "Hooks.Internal.".parse::<AllowEntry>(),
        Ok(AllowEntry::Host("hooks.internal".into()))
    );
}

#[tokio::test]
async fn resolution_checks_every_address_unless_allowed() {
    let none = AllowList::default();
    // `localhost.` resolves without a network; a trailing dot keeps it past the
    // registration check's RFC 6761 rule, so the resolved addresses are what refuse it.
    let target = Target {
        url: Url::parse("https://localhost:9/x").expect("url"),
        exempt: false,
    };
    match resolve(&target, &none).await {
        Err(Unreachable::Refused(Refusal::Resolves { range, .. })) => {
            assert_eq!(range.range, "loopback");
        }
        other => panic!("{other:?}"),
    }
    let networks = allow(&["127.0.0.0/8", "::1"]);
    let addrs = resolve(&target, &networks).await.expect("allowed network");
    assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
    let named = allow(&["localhost"]);
    let target = check_url("http://localhost:9/x", &named).expect("allowed host");
    assert!(!resolve(&target, &named).await.expect("resolves").is_empty());
    let literal = check_url("https://8.8.8.8/x", &none).expect("public");
    assert_eq!(
        resolve(&literal, &none).await.expect("literal"),
        [SocketAddr::from(([8, 8, 8, 8], 443))]
    );
}
