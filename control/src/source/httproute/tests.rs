//! Reading, defaulting and validating HTTPRoutes: each case is a spec as a user writes it and
//! what the API server (and wasmesh) would make of it.

use super::*;

/// A route in namespace `shop` with this spec (YAML, indented as under `spec:`).
fn route(spec: &str) -> Result<HttpRoute, String> {
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n{spec}"
    );
    let value: serde_json::Value = serde_saphyr::from_str(&yaml).map_err(|e| e.to_string())?;
    let mut route: HttpRoute = serde_json::from_value(value).map_err(|e| e.to_string())?;
    default_and_validate(&mut route).map_err(|e| e.to_string())?;
    Ok(route)
}

const PARENT: &str = "  parentRefs: [{group: \"\", kind: Service, name: web}]\n";

#[test]
fn defaults_are_the_api_servers() {
    let r = route(&format!(
        "{PARENT}  rules:\n  - backendRefs: [{{name: web-v2, port: 80}}]\n  - matches: [{{headers: [{{name: X-Canary, value: 'yes'}}]}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https}}}}]\n"
    ))
    .expect("valid");
    let p = &r.spec.parent_refs[0];
    assert_eq!(
        p.namespace.as_deref(),
        Some("shop"),
        "parentRef namespace = the route's"
    );
    assert!(p.is_service());
    let rules = r.spec.rules.as_ref().expect("rules");
    // A rule without matches matches PathPrefix "/".
    assert_eq!(
        rules[0].matches,
        Some(vec![HttpRouteMatch::default_match()])
    );
    let b = &rules[0].backend_refs[0];
    assert_eq!(
        (
            b.group.as_deref(),
            b.kind.as_deref(),
            b.namespace.as_deref(),
            b.weight
        ),
        (Some(""), Some("Service"), Some("shop"), Some(1))
    );
    // A match without a path gets PathPrefix "/", headers Exact.
    let m = &rules[1].matches.as_ref().expect("matches")[0];
    assert_eq!(m.path, Some(HttpPathMatch::default_path()));
    assert_eq!(m.headers[0].type_, Some(ValueMatchType::Exact));
    let redirect = rules[1].filters[0]
        .request_redirect
        .as_ref()
        .expect("redirect");
    assert_eq!(redirect.status_code, Some(302));

    // No rules at all: one rule on PathPrefix "/".
    let r = route(PARENT).expect("valid");
    assert_eq!(r.spec.rules, Some(vec![HttpRouteRule::default_rule()]));
    // A parentRef without group and kind names a Gateway, as the CRD defaults them.
    let r = route("  parentRefs: [{name: gw}]\n").expect("valid");
    assert!(!r.spec.parent_refs[0].is_service());
    assert_eq!(r.spec.parent_refs[0].kind.as_deref(), Some("Gateway"));
}

#[test]
fn defaulting_twice_changes_nothing() {
    let mut r = route(&format!(
        "{PARENT}  rules: [{{backendRefs: [{{name: a, port: 80}}], matches: [{{path: {{value: /a}}}}]}}]\n"
    ))
    .expect("valid");
    let once = r.clone();
    default_and_validate(&mut r).expect("still valid");
    assert_eq!(r, once);
}

#[test]
fn what_the_api_server_and_wasmesh_refuse() {
    // (spec, a piece of the error: the field and the reason)
    let cases: &[(&str, &str)] = &[
        (
            "  rules: [{matches: [{path: {type: PathPrefix, value: api}}]}]\n",
            "spec.rules[0].matches[0].path.value: \"api\" must be an absolute path",
        ),
        (
            "  rules: [{matches: [{path: {type: Exact, value: /a//b}}]}]\n",
            "must not contain '//'",
        ),
        (
            "  rules: [{matches: [{path: {value: /a/..}}]}]\n",
            "must not end with '/..'",
        ),
        (
            "  rules: [{matches: [{path: {value: '/a b'}}]}]\n",
            "must not contain ' '",
        ),
        (
            "  rules: [{matches: [{path: {type: RegularExpression, value: '/api/(v1'}}]}]\n",
            "spec.rules[0].matches[0].path.value: \"/api/(v1\" is not a valid regular expression: unclosed group",
        ),
        (
            "  rules: [{matches: [{path: {type: Glob, value: /a}}]}]\n",
            "path.type: \"Glob\" is not one of Exact, PathPrefix, RegularExpression",
        ),
        (
            "  rules: [{matches: [{headers: [{name: x, type: RegularExpression, value: '['}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].value",
        ),
        (
            "  rules: [{matches: [{headers: [{name: 'bad name', value: x}]}]}]\n",
            "is not a valid HTTP header name",
        ),
        (
            "  rules: [{matches: [{queryParams: [{name: q, value: a}, {name: q, value: b}]}]}]\n",
            "queryParams[1].name: \"q\" is matched twice",
        ),
        (
            "  rules: [{matches: [{method: FETCH}]}]\n",
            "\"FETCH\" is not one of GET",
        ),
        (
            "  rules: [{backendRefs: [{name: a, port: 80, weight: 1000001}]}]\n",
            "backendRefs[0].weight: 1000001 is not between 0 and 1000000",
        ),
        (
            "  rules: [{backendRefs: [{name: a, port: 80, weight: -1}]}]\n",
            "weight: -1",
        ),
        (
            "  rules: [{backendRefs: [{name: a}]}]\n",
            "backendRefs[0].port: Must have port for Service reference",
        ),
        (
            "  rules: [{backendRefs: [{name: a, port: 0}]}]\n",
            "0 is not a valid port",
        ),
        (
            "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]}]\n",
            "requestRedirect.statusCode: 307 is not 301 or 302",
        ),
        (
            "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]}]\n",
            "\"ftp\" is not http or https",
        ),
        (
            "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]\n",
            "spec.rules[0]: When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ),
        (
            "  rules: [{matches: [{path: {value: /a}}, {path: {value: /b}}], filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]\n",
            "When using RequestRedirect filter with path.replacePrefixMatch",
        ),
        (
            "  rules: [{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]}]\n",
            "path.replaceFullPath: must be specified when type is set to 'ReplaceFullPath'",
        ),
        (
            "  rules: [{filters: [{type: Teleport}]}]\n",
            "spec.rules[0].filters[0].type: \"Teleport\" is not a Gateway API filter type",
        ),
        (
            "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}]}]\n",
            "RequestMirror is not supported by wasmesh",
        ),
        (
            "  rules: [{filters: [{type: CORS, cors: {}}]}]\n",
            "CORS is not supported by wasmesh",
        ),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier}]}]\n",
            "filters[0].requestHeaderModifier: must be specified for RequestHeaderModifier filter.type",
        ),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}, urlRewrite: {}}]}]\n",
            "filters[0].urlRewrite: must be nil if the filter.type is not URLRewrite",
        ),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]}]\n",
            "RequestHeaderModifier filter cannot be repeated",
        ),
        (
            "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]}]\n",
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite",
        ),
        (
            "  rules: [{backendRefs: [{name: a, port: 80}], filters: [{type: RequestRedirect, requestRedirect: {}}]}]\n",
            "RequestRedirect filter must not be used together with backendRefs",
        ),
        (
            "  rules: [{backendRefs: [{name: a, port: 80, filters: [{type: URLRewrite, urlRewrite: {hostname: b}}]}]}]\n",
            "backendRefs[0].filters[0].type: URLRewrite on a backendRef is not supported by wasmesh",
        ),
        (
            "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: '1'}, {name: A, value: '2'}]}}]}]\n",
            "requestHeaderModifier.set[1].name: \"A\" is listed twice",
        ),
        (
            "  rules: [{timeouts: {request: 10x}}]\n",
            "spec.rules[0].timeouts.request: \"10x\" is not a Gateway API duration",
        ),
        (
            "  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]\n",
            "backendRequest timeout cannot be longer than request timeout",
        ),
        (
            "  rules: [{retry: {codes: [200]}}]\n",
            "retry.codes[0]: 200 is not an HTTP error status (400-599)",
        ),
        (
            "  rules: [{retry: {attempts: 0}}]\n",
            "retry.attempts: 0 must be at least 1",
        ),
        (
            "  rules: [{retry: {backoff: soon}}]\n",
            "retry.backoff: \"soon\"",
        ),
        ("  rules: []\n", "spec.rules: must not be empty"),
        (
            "  rules: [{name: a}, {name: a}]\n",
            "spec.rules[1].name: \"a\" is used by another rule",
        ),
        (
            "  rules: [{name: Upper}]\n",
            "spec.rules[0].name: \"Upper\" is not a valid name",
        ),
        (
            "  parentRefs: [{group: \"\", kind: Service, name: web}, {group: \"\", kind: Service, name: web, port: 80}]\n",
            "sectionName or port must be specified when parentRefs includes 2 or more references to the same parent",
        ),
        (
            "  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}, {group: \"\", kind: Service, name: web, port: 80}]\n",
            "sectionName or port must be unique",
        ),
        (
            "  parentRefs: [{group: \"\", kind: Service, name: web, port: 70000}]\n",
            "spec.parentRefs[0].port: 70000 is not a valid port",
        ),
    ];
    for (spec, want) in cases {
        let got = route(spec);
        match got {
            Err(e) => assert!(e.contains(want), "{spec}: expected {want:?} in\n  {e}"),
            Ok(r) => panic!("{spec}: accepted, expected {want:?}: {r:?}"),
        }
    }
}

#[test]
fn limits_are_the_crds() {
    let rule = |n: usize| {
        let m: Vec<String> = (0..n)
            .map(|i| format!("{{path: {{value: /m{i}}}}}"))
            .collect();
        format!("{{matches: [{}]}}", m.join(", "))
    };
    assert!(route(&format!("  rules: [{}]\n", rule(64))).is_ok());
    let e = route(&format!("  rules: [{}]\n", rule(65))).expect_err("65 matches");
    assert!(e.contains("at most 64 are allowed per rule"), "{e}");
    let rules = [rule(64), rule(64)].join(", ");
    assert!(
        route(&format!("  rules: [{rules}]\n")).is_ok(),
        "128 in all is the limit"
    );
    let rules = [rule(64), rule(64), rule(1)].join(", ");
    let e = route(&format!("  rules: [{rules}]\n")).expect_err("129 matches");
    assert!(e.contains("129 matches in all"), "{e}");
    let rules = vec!["{}"; 17].join(", ");
    let e = route(&format!("  rules: [{rules}]\n")).expect_err("17 rules");
    assert!(e.contains("17 rules; at most 16"), "{e}");
}

#[test]
fn what_is_accepted() {
    for spec in [
        // Everything wasmesh implements, at once.
        "  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}, {group: \"\", kind: Service, name: web, port: 81}]\n  hostnames: [web.shop.svc.cluster.local]\n  rules:\n  - name: canary\n    matches:\n    - path: {type: PathPrefix, value: /api}\n      headers: [{name: X-Canary, value: 'yes'}, {type: RegularExpression, name: x-user, value: '^u[0-9]+$'}]\n      queryParams: [{name: debug, value: '1'}]\n      method: GET\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: a}], add: [{name: x-b, value: b}], remove: [x-c]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [server]}}\n    - {type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}\n    backendRefs:\n    - {name: web-v2, port: 8080, weight: 90, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-v, value: '2'}]}}]}\n    - {name: web-v1, namespace: legacy, port: 80, weight: 10}\n    timeouts: {request: 10s, backendRequest: 2s}\n    retry: {codes: [503], attempts: 3, backoff: 100ms}\n  - matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: shop.example, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /moved}}}]\n",
        // A zero request timeout disables it; backendRequest may then be anything.
        "  rules: [{timeouts: {request: 0s, backendRequest: 1h}}]\n",
        // Weight 0 is allowed (the backend receives nothing).
        "  rules: [{backendRefs: [{name: a, port: 80, weight: 0}]}]\n",
        // A backendRef of another kind needs no port (the mesh cannot resolve it; not an error).
        "  rules: [{backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: a}]}]\n",
        // Fields wasmesh ignores.
        "  rules: [{sessionPersistence: {sessionName: s}}]\n",
    ] {
        if let Err(e) = route(spec) {
            panic!("{spec}: refused: {e}");
        }
    }
}

#[test]
fn serialized_as_the_api_server_writes_it() {
    let r = route(PARENT).expect("valid");
    let v = serde_json::to_value(&r).expect("json");
    assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(v["kind"], "HTTPRoute");
    assert_eq!(v["spec"]["parentRefs"][0]["kind"], "Service");
    assert_eq!(
        v["spec"]["rules"][0]["matches"][0]["path"]["type"],
        "PathPrefix"
    );
    // And read back to the same route.
    let back: HttpRoute = serde_json::from_value(v).expect("reads back");
    assert_eq!(back, r);
}
