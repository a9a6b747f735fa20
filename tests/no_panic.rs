//! Property tests: every parser of untrusted input (a client's or the upstream's bytes, an
//! operator's configuration) takes arbitrary bytes and extreme numbers without panicking.
//! `cargo test no_panic` runs them all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudcasa_gateway::config::{Config, Overrides, TelemetryConfig};
use cloudcasa_gateway::layers::cache::rules::{self, Directives};
use cloudcasa_gateway::layers::cache::shared;
use cloudcasa_gateway::layers::canonical::{MethodRules, canonical_path};
use cloudcasa_gateway::layers::identity::{api_keys, kubernetes};
use cloudcasa_gateway::layers::policy::{Rate, RuleSpec};
use cloudcasa_gateway::observability::telemetry::{ServerRequest, Telemetry};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version, header};
use proptest::prelude::*;

/// Bytes a header value can hold (visible ASCII, space, tab, obs-text).
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        proptest::collection::vec(
            prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff],
            0..80
        )
        .prop_map(|b| HeaderValue::from_bytes(&b).expect("valid header bytes")),
        extreme_number().prop_map(|n| HeaderValue::from_str(&n).unwrap()),
    ]
}

/// Numbers at and past every integer limit, as a header or directive would carry them.
fn extreme_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999999999".to_string()),
        Just("-1".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn directive() -> impl Strategy<Value = String> {
    let names = prop_oneof![
        Just("max-age"),
        Just("s-maxage"),
        Just("min-fresh"),
        Just("max-stale"),
        Just("stale-if-error"),
        Just("no-cache"),
        Just("no-store"),
    ];
    (names, extreme_number(), any::<bool>()).prop_map(|(n, v, quoted)| {
        if quoted {
            format!("{n}=\"{v}\"")
        } else {
            format!("{n}={v}")
        }
    })
}

fn headers_with(name: HeaderName, values: Vec<HeaderValue>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(name.clone(), v);
    }
    h
}

proptest! {
    #[test]
    fn no_panic_cache_control_age_and_dates(
        cc in proptest::collection::vec(header_value(), 0..4),
        directives in proptest::collection::vec(directive(), 0..4),
        age in header_value(),
        age_number in extreme_number(),
        date in header_value(),
        expires in header_value(),
        age_secs in any::<u64>(),
        lifetime_secs in any::<u64>(),
        fresh_for in any::<u64>(),
    ) {
        let mut h = headers_with(header::CACHE_CONTROL, cc);
        h.append(header::CACHE_CONTROL, HeaderValue::from_str(&directives.join(", ")).unwrap());
        h.insert(header::AGE, age);
        h.append(header::AGE, HeaderValue::from_str(&age_number).unwrap());
        h.insert(header::DATE, date.clone());
        h.insert(header::EXPIRES, expires);
        let d = Directives::parse(&h);
        let _ = d.forbids_stale();
        let now = SystemTime::now();
        let lifetime = rules::freshness_lifetime(&h, &d, Duration::from_secs(fresh_for));
        let initial = rules::initial_age(&h, UNIX_EPOCH, now);
        let _ = rules::initial_age(&h, now, UNIX_EPOCH);
        let _ = rules::fresh_enough(initial, lifetime, &d, false);
        let _ = rules::fresh_enough(
            Duration::from_secs(age_secs),
            Duration::from_secs(lifetime_secs),
            &d,
            d.forbids_stale(),
        );
        let _ = rules::http_date(&date);
        let _ = rules::storable(http::StatusCode::OK, &d, &h, &d);
    }

    #[test]
    fn no_panic_conditionals_and_key_headers(
        inm in header_value(),
        ims in header_value(),
        etag in header_value(),
        accept in proptest::collection::vec(header_value(), 0..3),
        vary in header_value(),
    ) {
        let mut h = headers_with(header::ACCEPT, accept);
        h.insert(header::IF_NONE_MATCH, inm.clone());
        h.insert(header::IF_MODIFIED_SINCE, ims.clone());
        h.insert(header::VARY, vary);
        let _ = rules::if_none_match(&inm, &etag);
        let _ = rules::not_modified(&h, Some(&etag), Some(&ims));
        let names = rules::vary_names(&h);
        let _ = rules::vary_values(&names, &h);
        let _ = rules::representation_key(
            &cloudcasa_gateway::config::KeyHeaders::new(vec![header::ACCEPT, header::ACCEPT_ENCODING]),
            &h,
        );
    }

    #[test]
    fn no_panic_shared_cache_entries(
        raw in proptest::collection::vec(any::<u8>(), 0..512),
        flip in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<usize>(),
    ) {
        // What Redis returns was written by any replica, or by whoever else can write there:
        // arbitrary bytes, and a valid entry with one byte changed or cut short, decode to an
        // entry or to nothing, never a panic.
        let _ = shared::decode(&bytes::Bytes::from(raw.clone()));
        let mut prefixed = b"CCG1".to_vec();
        prefixed.extend_from_slice(&raw);
        let _ = shared::decode(&bytes::Bytes::from(prefixed.clone()));
        if !prefixed.is_empty() {
            let i = flip % prefixed.len();
            prefixed[i] = byte;
            let _ = shared::decode(&bytes::Bytes::from(prefixed[..cut % (prefixed.len() + 1)].to_vec()));
        }
    }

    #[test]
    fn no_panic_ranges(
        raw in header_value(),
        first in extreme_number(),
        last in extreme_number(),
        suffix in extreme_number(),
        len in prop_oneof![Just(0u64), Just(1u64), 0u64..4096, Just(u64::MAX)],
    ) {
        let ranges = [
            raw.to_str().unwrap_or("").to_string(),
            format!("bytes={first}-{last}"),
            format!("bytes={first}-"),
            format!("bytes=-{suffix}"),
            format!("bytes={first}-{last}, -{suffix}"),
        ];
        for range in &ranges {
            match rules::byte_range(range, len) {
                // Whatever the numbers, a part lies within the body: slicing cannot panic.
                rules::ByteRange::Part { start, end } => {
                    prop_assert!(start <= end && end < len, "{range:?} on {len}: {start}-{end}");
                }
                rules::ByteRange::Whole | rules::ByteRange::Unsatisfiable => {}
            }
        }
    }

    #[test]
    fn no_panic_paths_and_methods(
        path in "(/|[a-z%.\\\\0-9A-F~;]){0,40}",
        raw in proptest::collection::vec(any::<u8>(), 0..64),
        method in "[A-Za-z!#$%&'*+.^_`|~-]{1,12}",
        override_value in header_value(),
    ) {
        if let Ok(canonical) = canonical_path(&path) {
            // A canonical path is its own canonical form, and a valid request target.
            prop_assert_eq!(canonical_path(&canonical).unwrap(), canonical.clone());
            prop_assert!(canonical.parse::<Uri>().is_ok());
        }
        let _ = canonical_path(&String::from_utf8_lossy(&raw));
        let rules = MethodRules::default();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-http-method-override", override_value);
        let _ = rules.effective(&method, &h);
        let _ = rules.effective(&Method::POST, &h);
    }

    #[test]
    fn no_panic_rates_durations_and_globs(
        rate in "[0-9]{0,25}/[smhd ]?",
        text in ".{0,30}",
        duration in "[0-9]{0,30}(ns|ms|s|m|h|d|y|)",
        glob in ".{0,30}",
        path_glob in "/.{0,30}",
    ) {
        let _ = Rate::parse(&rate);
        let _ = Rate::parse(&text);
        if let Ok(rate) = Rate::parse(&rate) {
            let _ = rate.quota();
        }
        let toml = format!(
            "[server]\nheader_timeout = {duration:?}\n[upstream]\ntimeout = {text:?}\n\
             [token]\nfile = \"/t\"\n[[policy]]\nclients = [{glob:?}]\npaths = [{path_glob:?}]\n\
             rate = {rate:?}\ncredential = \"default\"\n"
        );
        if let Ok(raw) = Config::parse(&toml) {
            let _ = Config::from_raw(raw, &Overrides::default());
        }
        let _ = RuleSpec::new(
            "r".into(),
            vec![glob.clone(), format!("apikey:{glob}")],
            Some(vec![text.clone()]),
            Some(vec![path_glob.clone()]),
            "c".into(),
            None,
        );
    }

    #[test]
    fn no_panic_api_keys_files_and_tokens(
        file in ".{0,200}",
        id in "[a-z\"= ]{0,10}",
        digest in "[0-9a-fA-Fg]{0,70}",
        token in "[A-Za-z0-9_=.-]{0,120}",
        claims in ".{0,60}",
        exp in extreme_number(),
    ) {
        let _ = api_keys::parse(&file);
        let _ = api_keys::parse(&format!("{id} = \"sha256:{digest}\""));
        let now = SystemTime::now();
        let _ = kubernetes::precheck(&token, "gw", now);
        let _ = kubernetes::token_expiry(&token);
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for payload in [claims.clone(), format!("{{\"exp\":{exp},\"aud\":\"gw\"}}")] {
            let jwt = format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(&payload));
            let _ = kubernetes::precheck(&jwt, "gw", now);
            let _ = kubernetes::token_expiry(&jwt);
        }
    }

    #[test]
    fn no_panic_traceparent_and_request_ids(
        traceparent in header_value(),
        shaped in "[0-9a-f]{2}-[0-9a-fA-F]{0,34}-[0-9a-f]{0,18}-[0-9a-z]{0,3}",
        id in header_value(),
    ) {
        let telemetry = Telemetry::new(&TelemetryConfig {
            otlp_endpoint: None,
            service_name: "t".into(),
        })
        .unwrap();
        for value in [traceparent, HeaderValue::from_str(&shaped).unwrap()] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", value.clone());
            h.insert("tracestate", value);
            let _ = telemetry.server_span(ServerRequest {
                uri: &Uri::from_static("/api/v1/x"),
                headers: &h,
                version: Version::HTTP_11,
                scheme: "http",
                route: "/*",
                client_addr: None,
            });
        }
        let _ = cloudcasa_gateway::layers::request_id::is_sane(&id);
    }
}
