//! The EgressRouter resource (network.operator.openshift.io/v1) and what the cluster network
//! operator makes of it: the NetworkAttachmentDefinition of the `egress-router` CNI plugin and
//! the Deployment whose pod carries it; plus the Service the operator leaves to the user.
//!
//! Pure: the resource as JSON (the caller reads the YAML) in, the three objects as YAML text or
//! every problem out, each naming the field as the CRD's schema does
//! (`spec.redirect.redirectRules[1].port`). The rendered CNI configuration is then checked by
//! the plugin's own parser, so that a resource this accepts is one the plugin accepts.
use std::collections::HashMap;

use serde_json::{Value, json};

use super::{cni::parse_cni, lines::show};

/// What the operator names the objects it renders (bindata/egress-router), whatever the
/// resource is called.
pub const NAD_NAME: &str = "egress-router-cni-nad";
pub const DEPLOYMENT_NAME: &str = "egress-router-cni-deployment";
/// The image of the pod's one container: the plugin did the work when the pod was created,
/// the container only holds the pod (the operator runs its CNI image's `sleep infinity`).
pub const POD_IMAGE: &str = "registry.k8s.io/pause:3.9";

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn string<'a>(v: &'a Value, field: &str, errors: &mut Vec<String>) -> Option<&'a str> {
    match v {
        Value::String(s) => Some(s),
        other => {
            errors.push(format!("{field}: must be a string, not {other}"));
            None
        }
    }
}

fn port(v: &Value, field: &str, errors: &mut Vec<String>) -> Option<u16> {
    match v.as_u64() {
        Some(p @ 1..=65535) => Some(p as u16),
        _ => {
            errors.push(format!(
                "{field}: {v} is not a port (an integer from 1 to 65535)"
            ));
            None
        }
    }
}

/// One redirect rule as the operator writes it into `ip.destinations`.
struct Rule {
    port: u16,
    protocol: String,
    text: String,
}

/// Renders `resource`; on error, every problem found.
pub fn render_egressrouter(resource: &Value) -> Result<String, Vec<String>> {
    let mut errors = Vec::new();
    match (get(resource, "apiVersion"), get(resource, "kind")) {
        (Some(Value::String(a)), Some(Value::String(k)))
            if a == "network.operator.openshift.io/v1" && k == "EgressRouter" => {}
        (a, k) => errors.push(format!(
            "apiVersion/kind: {} {} is not an EgressRouter (expected apiVersion \
             network.operator.openshift.io/v1, kind EgressRouter)",
            a.map_or("(none)".to_string(), Value::to_string),
            k.map_or("(none)".to_string(), Value::to_string)
        )),
    }
    let meta = get(resource, "metadata").cloned().unwrap_or(Value::Null);
    let name = match get(&meta, "name") {
        Some(v) => string(v, "metadata.name", &mut errors).map(str::to_string),
        None => {
            errors.push("metadata.name: required".to_string());
            None
        }
    };
    let namespace = match get(&meta, "namespace") {
        Some(v) => string(v, "metadata.namespace", &mut errors)
            .unwrap_or("default")
            .to_string(),
        None => "default".to_string(),
    };
    let Some(spec) = get(resource, "spec") else {
        errors.push("spec: required".to_string());
        return Err(errors);
    };
    for key in spec.as_object().into_iter().flat_map(|o| o.keys()) {
        if !matches!(
            key.as_str(),
            "addresses" | "mode" | "networkInterface" | "redirect"
        ) {
            errors.push(format!(
                "spec.{}: unknown field (addresses, mode, networkInterface, redirect)",
                show(key)
            ));
        }
    }
    match get(spec, "mode") {
        None => {}
        Some(Value::String(m)) if m == "Redirect" => {}
        Some(m) => errors.push(format!(
            "spec.mode: {m} is not supported (Redirect, the only mode, and the default)"
        )),
    }
    // spec.addresses: the first is the router's (the operator uses only it).
    let (ip, gateway) = match get(spec, "addresses").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            if a.len() > 1 {
                errors.push(format!(
                    "spec.addresses: {} addresses; the egress router uses one (the operator \
                     silently uses the first)",
                    a.len()
                ));
            }
            let first = &a[0];
            let ip = match get(first, "ip") {
                Some(v) => string(v, "spec.addresses[0].ip", &mut errors).map(str::to_string),
                None => {
                    errors.push("spec.addresses[0].ip: required".to_string());
                    None
                }
            };
            let gw = match get(first, "gateway") {
                Some(v) => string(v, "spec.addresses[0].gateway", &mut errors).map(str::to_string),
                None => {
                    errors.push(
                        "spec.addresses[0].gateway: required by egress-router (the default \
                         route goes through it; nothing determines it automatically)"
                            .to_string(),
                    );
                    None
                }
            };
            (ip, gw)
        }
        _ => {
            errors.push("spec.addresses: required, with at least one {ip, gateway}".to_string());
            (None, None)
        }
    };
    // spec.networkInterface.macvlan: the plugin's interfaceArgs.
    let mut interface_args = serde_json::Map::new();
    if let Some(ni) = get(spec, "networkInterface") {
        match get(ni, "macvlan") {
            Some(mv) => {
                if let Some(m) = get(mv, "mode") {
                    match m.as_str() {
                        Some("Bridge") => {}
                        Some(mode @ ("Private" | "VEPA" | "Passthru")) => {
                            interface_args.insert("mode".into(), json!(mode.to_lowercase()));
                        }
                        _ => errors.push(format!(
                            "spec.networkInterface.macvlan.mode: {m} is not one of Bridge, \
                             Private, VEPA, Passthru"
                        )),
                    }
                }
                if let Some(m) = get(mv, "master")
                    && let Some(m) = string(m, "spec.networkInterface.macvlan.master", &mut errors)
                    && !m.is_empty()
                {
                    interface_args.insert("master".into(), json!(m));
                }
            }
            None => errors.push(
                "spec.networkInterface: only macvlan is supported (spec.networkInterface.macvlan)"
                    .to_string(),
            ),
        }
    }
    // spec.redirect: the rules in the operator's form, and the fallback.
    let mut rules = Vec::new();
    let mut fallback = None;
    match get(spec, "redirect") {
        None => errors.push("spec.redirect: required in Redirect mode".to_string()),
        Some(r) => {
            for (i, rule) in get(r, "redirectRules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let field = |k: &str| format!("spec.redirect.redirectRules[{i}].{k}");
                let dest = match get(rule, "destinationIP") {
                    Some(v) => string(v, &field("destinationIP"), &mut errors),
                    None => {
                        errors.push(format!("{}: required", field("destinationIP")));
                        None
                    }
                };
                let p = match get(rule, "port") {
                    Some(v) => port(v, &field("port"), &mut errors),
                    None => {
                        errors.push(format!("{}: required", field("port")));
                        None
                    }
                };
                let proto = match get(rule, "protocol").and_then(Value::as_str) {
                    Some(p @ ("TCP" | "UDP" | "SCTP")) => Some(p),
                    other => {
                        errors.push(format!(
                            "{}: {} is not one of TCP, UDP, SCTP",
                            field("protocol"),
                            other.map_or("(none)".to_string(), str::to_string)
                        ));
                        None
                    }
                };
                let target = get(rule, "targetPort")
                    .and_then(|v| port(v, &field("targetPort"), &mut errors));
                if let (Some(d), Some(p), Some(proto)) = (dest, p, proto) {
                    let text = match target {
                        Some(t) => format!("{p} {proto} {d} {t}"),
                        None => format!("{p} {proto} {d}"),
                    };
                    rules.push(Rule {
                        port: p,
                        protocol: proto.to_string(),
                        text,
                    });
                }
            }
            if let Some(f) = get(r, "fallbackIP") {
                fallback = string(f, "spec.redirect.fallbackIP", &mut errors).map(str::to_string);
            }
            if rules.is_empty() && fallback.as_deref().is_none_or(str::is_empty) {
                errors.push(
                    "spec.redirect: neither redirectRules nor fallbackIP: the router would \
                     forward nothing"
                        .to_string(),
                );
            }
        }
    }
    let (Some(name), Some(ip), Some(gateway)) = (name, ip, gateway) else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut ip_section = json!({
        "addresses": [ip],
        "destinations": rules.iter().map(|r| r.text.clone()).collect::<Vec<_>>(),
        "gateway": gateway,
    });
    if let Some(f) = fallback.filter(|f| !f.is_empty()) {
        ip_section["fallbackIP"] = json!(f);
    }
    let mut config = json!({
        "cniVersion": "0.4.0",
        "type": "egress-router",
        "name": NAD_NAME,
        "ip": ip_section,
        "log_file": "/tmp/egress-router-log",
        "log_level": "debug",
    });
    if !interface_args.is_empty() {
        config["interfaceArgs"] = Value::Object(interface_args);
    }
    // The plugin's own checks, with the rendered field's name translated back.
    let keys: HashMap<String, Value> = serde_json::from_value(config.clone()).expect("an object");
    if let Err(problems) = parse_cni(&keys) {
        return Err(problems
            .into_iter()
            .map(|p| {
                format!(
                    "{} (rendered from spec: {})",
                    p.message,
                    translate(&p.message)
                )
            })
            .collect());
    }
    Ok(yaml(&name, &namespace, &config, &gateway, &rules))
}

/// Which field of the resource a message about the rendered config is about.
fn translate(message: &str) -> String {
    let field = message.split([':', ' ']).next().unwrap_or("");
    if let Some(i) = field
        .strip_prefix("ip.destinations[")
        .and_then(|r| r.strip_suffix(']'))
    {
        format!("spec.redirect.redirectRules[{i}]")
    } else {
        match field {
            "ip.fallbackIP" => "spec.redirect.fallbackIP".to_string(),
            "ip.addresses[0]" => "spec.addresses[0].ip".to_string(),
            "ip.gateway" => "spec.addresses[0].gateway".to_string(),
            f if f.starts_with("interfaceArgs") => "spec.networkInterface.macvlan".to_string(),
            _ => "spec".to_string(),
        }
    }
}

fn yaml(name: &str, namespace: &str, config: &Value, gateway: &str, rules: &[Rule]) -> String {
    let pretty = serde_json::to_string_pretty(config).expect("serializable");
    let config_block: String = pretty.lines().map(|l| format!("    {l}\n")).collect();
    let mut out = format!(
        "# Rendered by `egress-router render-egressrouter` from the EgressRouter {namespace}/{name}:\n\
         # what the cluster network operator creates for it, plus a Service.\n\
         apiVersion: k8s.cni.cncf.io/v1\n\
         kind: NetworkAttachmentDefinition\n\
         metadata:\n  name: {NAD_NAME}\n  namespace: {namespace}\n\
         spec:\n  config: |\n{config_block}\
         ---\n\
         apiVersion: apps/v1\n\
         kind: Deployment\n\
         metadata:\n  name: {DEPLOYMENT_NAME}\n  namespace: {namespace}\n  labels:\n    app: egress-router-cni\n\
         spec:\n  replicas: 1\n  strategy:\n    type: Recreate\n  selector:\n    matchLabels:\n      app: egress-router-cni\n\
         \x20 template:\n    metadata:\n      labels:\n        app: egress-router-cni\n      annotations:\n\
         \x20       k8s.v1.cni.cncf.io/networks: |\n\
         \x20         [{{\"name\": \"{NAD_NAME}\", \"default-route\": [\"{gateway}\"]}}]\n\
         \x20   spec:\n      containers:\n        - name: egress-router-cni-pod\n          image: {POD_IMAGE}\n\
         \x20         resources:\n            requests:\n              cpu: 10m\n              memory: 8Mi\n"
    );
    if !rules.is_empty() {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n  selector:\n    app: egress-router-cni\n  ports:\n"
        );
        for r in rules {
            out += &format!(
                "    - name: {}-{}\n      protocol: {}\n      port: {}\n",
                r.protocol.to_lowercase(),
                r.port,
                r.protocol,
                r.port
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qe() -> Value {
        json!({
            "apiVersion": "network.operator.openshift.io/v1",
            "kind": "EgressRouter",
            "metadata": {"name": "egress-router-redirect", "namespace": "egress-router-demo"},
            "spec": {
                "mode": "Redirect",
                "networkInterface": {"macvlan": {"mode": "Bridge"}},
                "addresses": [{"ip": "192.168.3.10/24", "gateway": "192.168.3.1"}],
                "redirect": {
                    "redirectRules": [
                        {"destinationIP": "10.100.3.0", "port": 80, "protocol": "UDP"},
                        {"destinationIP": "203.0.113.27", "port": 8443, "targetPort": 443, "protocol": "TCP"}
                    ],
                    "fallbackIP": "203.0.113.30"
                }
            }
        })
    }

    #[test]
    fn renders_the_operators_objects_and_a_service() {
        let y = render_egressrouter(&qe()).unwrap();
        assert!(y.contains(r#""destinations": ["#), "{y}");
        assert!(y.contains(r#""8443 TCP 203.0.113.27 443""#), "{y}");
        assert!(y.contains(r#""fallbackIP": "203.0.113.30""#), "{y}");
        assert!(
            y.contains(r#"[{"name": "egress-router-cni-nad", "default-route": ["192.168.3.1"]}]"#),
            "{y}"
        );
        assert!(
            y.contains("kind: Service\nmetadata:\n  name: egress-router-redirect\n"),
            "{y}"
        );
        assert!(
            y.contains("    - name: udp-80\n      protocol: UDP\n      port: 80\n"),
            "{y}"
        );
        assert!(!y.contains("interfaceArgs"), "Bridge is the default: {y}");
    }

    #[test]
    fn invalid_resources_are_refused_naming_the_field() {
        let mut r = qe();
        r["spec"]["redirect"]["redirectRules"][1]["port"] = json!(0);
        r["spec"]["redirect"]["redirectRules"][0]["protocol"] = json!("ICMP");
        r["spec"]["networkInterface"]["macvlan"]["mode"] = json!("Bridged");
        r["spec"]["addresses"][0]
            .as_object_mut()
            .unwrap()
            .remove("gateway");
        let e = render_egressrouter(&r).unwrap_err();
        for want in [
            "spec.redirect.redirectRules[1].port: 0 is not a port",
            "spec.redirect.redirectRules[0].protocol: ICMP is not one of TCP, UDP, SCTP",
            "spec.networkInterface.macvlan.mode: \"Bridged\" is not one of",
            "spec.addresses[0].gateway: required",
        ] {
            assert!(e.iter().any(|m| m.starts_with(want)), "{want}: {e:?}");
        }
        let mut r = qe();
        r["spec"]["redirect"]["redirectRules"][0]["destinationIP"] = json!("10.100.3.300");
        let e = render_egressrouter(&r).unwrap_err();
        assert!(
            e[0].starts_with("ip.destinations[0]: '80 UDP 10.100.3.300'")
                && e[0].ends_with("(rendered from spec: spec.redirect.redirectRules[0])"),
            "{e:?}"
        );
    }
}
