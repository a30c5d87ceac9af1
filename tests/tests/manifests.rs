//! deploy/'s manifests, validated offline: every object against the Kubernetes schemas
//! (kubernetes-validate, strict: no unknown fields), every NetworkAttachmentDefinition against its
//! CRD's schema (check-jsonschema) with a CNI config that parses, and within each mode's folder
//! the four forms (OpenShift and plain Kubernetes, Pod and Deployment) run the same containers.
//! The validators are pinned and installed by `cargo xtask setup` under the target directory.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `target/validators/bin/<tool>` of the target directory this test was built into.
fn validator(tool: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .unwrap()
        .join("validators/bin")
        .join(tool);
    assert!(
        bin.exists(),
        "{} missing: `cargo xtask setup` installs the manifest validators",
        bin.display()
    );
    bin
}

fn manifests() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(deploy()).unwrap() {
        let dir = dir.unwrap().path();
        // schemas/ holds what the manifests are checked against, not manifests.
        if !dir.is_dir() || dir.ends_with("schemas") {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "yaml") {
                files.push(f);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 16, "deploy/ has only {files:?}");
    files
}

/// The YAML documents of a file.
fn documents(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .split("\n---\n")
        .map(str::to_string)
        .collect()
}

fn kind(doc: &str) -> &str {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or("")
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    let out = Command::new(validator("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(&files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // Only the NetworkAttachmentDefinitions (checked below) and the EgressRouter (an
    // OpenShift CRD) are unknown to it.
    for line in text.lines().filter(|l| !l.starts_with("INFO")) {
        assert!(
            line.contains("Couldn't find schema for kind NetworkAttachmentDefinition")
                || line.contains("Couldn't find schema for kind EgressRouter"),
            "{line}\n{text}"
        );
    }
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    let objects: usize = files
        .iter()
        .map(|f| {
            documents(f)
                .iter()
                .filter(|d| !matches!(kind(d), "NetworkAttachmentDefinition" | "EgressRouter"))
                .count()
        })
        .sum();
    assert_eq!(passed, objects, "{text}");
}

/// The openAPIV3Schema of the published CRD's served v1 version (deploy/schemas/networks-crd.yaml,
/// vendored unchanged), written as a JSON schema file into `dir`.
fn published_crd_schema(dir: &Path) -> PathBuf {
    let out = dir.join("published-crd.schema.json");
    let script = r#"
import json, sys, yaml
crd = yaml.safe_load(open(sys.argv[1]))
v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
assert len(v1) == 1, "the CRD serves no single v1 version"
json.dump(v1[0]["schema"]["openAPIV3Schema"], open(sys.argv[2], "w"))
"#;
    // The validators' virtualenv has PyYAML (kubernetes-validate depends on it).
    let status = Command::new(validator("python3"))
        .args(["-c", script])
        .arg(deploy().join("schemas/networks-crd.yaml"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "reading the published CRD's schema");
    out
}

#[test]
fn network_attachment_definitions_match_their_crd_schema() {
    let dir = std::env::temp_dir().join(format!("er-nad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The published CRD's schema (what the API server checks), then ours, which also refuses
    // what the API server would silently prune.
    let schemas = [
        published_crd_schema(&dir),
        deploy().join("schemas/network-attachment-definition.schema.json"),
    ];
    let mut checked = 0;
    for f in manifests() {
        for doc in documents(&f)
            .into_iter()
            .filter(|d| kind(d) == "NetworkAttachmentDefinition")
        {
            let file = dir.join(format!("nad-{checked}.yaml"));
            std::fs::write(&file, &doc).unwrap();
            for schema in &schemas {
                let out = Command::new(validator("check-jsonschema"))
                    .arg("--schemafile")
                    .arg(schema)
                    .arg(&file)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{} against {}: {}{}",
                    f.display(),
                    schema.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The CNI config is JSON: a macvlan, named as the pods' annotation names it; or the
            // egress-router CNI plugin's (OpenShift 4.x), which the plugin's parser accepts.
            let config: String = doc
                .split("config: |\n")
                .nth(1)
                .expect("config block")
                .to_string();
            let cni: serde_json::Value = serde_json::from_str(&config)
                .unwrap_or_else(|e| panic!("{}: the CNI config is not JSON: {e}", f.display()));
            let text = std::fs::read_to_string(&f).unwrap();
            if cni["type"] == "egress-router" {
                let keys: std::collections::HashMap<String, serde_json::Value> =
                    serde_json::from_value(cni.clone()).unwrap();
                if let Err(problems) = egress_router::config::cni::parse_cni(&keys) {
                    panic!(
                        "{}: the plugin refuses its config: {problems:?}",
                        f.display()
                    );
                }
                let annotation = format!(r#"[{{"name": "{}", "#, cni["name"].as_str().unwrap());
                assert!(
                    text.contains(&annotation),
                    "{}: no pod asks for the network {}",
                    f.display(),
                    cni["name"]
                );
                checked += 1;
                continue;
            }
            assert_eq!(cni["type"], "macvlan", "{}", f.display());
            assert!(
                text.contains(r#"[{"name": "egress-macvlan", "interface": "macvlan0"}]"#),
                "{}: no pod asks for this network as macvlan0",
                f.display()
            );
            checked += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(checked >= 8, "only {checked} NetworkAttachmentDefinitions");
}

/// The pod spec of a Pod document, or of a Deployment's template, de-indented to the Pod's.
/// A bare Pod's restart policy (OnFailure) is left out: a Deployment's is always Always.
fn pod_spec(doc: &str) -> Option<String> {
    match kind(doc) {
        "Pod" => {
            let spec = doc.split_once("\nspec:\n")?.1;
            Some(
                spec.lines()
                    .filter(|l| !l.starts_with("  restartPolicy: ") && !l.starts_with("  # "))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
        "Deployment" => {
            let spec = doc.split_once("\n    spec:\n")?.1;
            Some(
                spec.lines()
                    .map(|l| l.strip_prefix("    ").unwrap_or(l))
                    .filter(|l| !l.starts_with("  # "))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
        _ => None,
    }
}

#[test]
fn each_modes_four_forms_run_the_same_containers() {
    for dir in ["redirect", "redirect-legacy", "http-proxy", "dns-proxy"] {
        let forms = [
            "openshift-pod.yaml",
            "openshift-deployment.yaml",
            "kubernetes-pod.yaml",
            "kubernetes-deployment.yaml",
        ];
        let specs: Vec<String> = forms
            .iter()
            .map(|f| {
                let path = deploy().join(dir).join(f);
                documents(&path)
                    .iter()
                    .find_map(|d| pod_spec(d))
                    .unwrap_or_else(|| panic!("{} has no pod", path.display()))
            })
            .collect();
        for (f, s) in forms.iter().zip(&specs).skip(1) {
            assert_eq!(
                s.trim_end(),
                specs[0].trim_end(),
                "{dir}/{f} differs from {dir}/{}",
                forms[0]
            );
        }
        for f in &forms[1..] {
            let text = std::fs::read_to_string(deploy().join(dir).join(f)).unwrap();
            if f.ends_with("deployment.yaml") {
                assert!(
                    text.contains("replicas: 1") && text.contains("type: Recreate"),
                    "{dir}/{f}: one replica, recreated"
                );
            }
            if f.starts_with("openshift") {
                assert!(text.contains(r#"pod.network.openshift.io/assign-macvlan: "true""#));
            }
        }
    }
}

/// deploy/egressrouter/openshift-rendered.yaml is exactly what `egress-router
/// render-egressrouter` prints for deploy/egressrouter/egressrouter.yaml (regenerate it with
/// that command), and an invalid resource is refused naming the field.
#[test]
fn the_rendered_egressrouter_objects_are_what_the_command_prints() {
    let dir = deploy().join("egressrouter");
    let out = Command::new(egress_tests::router_bin())
        .arg("render-egressrouter")
        .arg(dir.join("egressrouter.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render-egressrouter failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = std::fs::read_to_string(dir.join("openshift-rendered.yaml")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "deploy/egressrouter/openshift-rendered.yaml is not the command's output"
    );
    let bad = std::env::temp_dir().join(format!("er-bad-egressrouter-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(dir.join("egressrouter.yaml"))
        .unwrap()
        .replace("port: 8443", "port: 84430");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(egress_tests::router_bin())
        .arg("render-egressrouter")
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("spec.redirect.redirectRules[2].port: 84430 is not a port"),
        "{err}"
    );
}
