use super::*;

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        config.linkerd.io/skip-outbound-ports: "3306"
        config.pylon.io/proxy-log-level: debug
        config.linkerd.io/proxy-cpu-limit: "1"
    spec:
      serviceAccountName: web
      containers:
      - name: app
        image: web:1
        ports:
        - {containerPort: 8080, name: http}
        - {containerPort: 9090, protocol: UDP}
"#;

fn yaml(s: &str) -> Value {
    serde_yaml_ng::from_str(s).expect("test YAML")
}

fn config() -> InjectConfig {
    let mut c = InjectConfig::new("0.1.0");
    c.trust_anchors_pem =
        Some("-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".into());
    c
}

fn template(v: &Value) -> &Value {
    &v["spec"]["template"]
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence()
        .map(|s| s.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn env_of<'v>(container: &'v Value, name: &str) -> Option<&'v str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

#[test]
fn a_deployment_gets_the_init_step_and_a_native_sidecar() {
    let mut d = yaml(DEPLOYMENT);
    let notes = inject(&mut d, &config()).expect("inject");
    assert_eq!(notes[0].to_string(), "Deployment shop/web: injected");
    let spec = &template(&d)["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["pylon-init", "pylon-proxy"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
    let ports: Vec<(&str, u64)> = proxy["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["containerPort"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("pylon-proxy", 4143),
            ("pylon-admin", 4191),
            ("pylon-tap", 4190)
        ]
    );
    assert_eq!(env_of(proxy, "PYLON_INBOUND_PORTS"), Some("8080"));
    assert_eq!(env_of(proxy, "PYLON_WORKLOAD"), Some("deployment/web"));
    assert_eq!(env_of(proxy, "PYLON_LOG"), Some("debug"));
    assert_eq!(
        env_of(proxy, "PYLON_DESTINATION_ADDR"),
        Some("pylon-dst.pylon.svc.cluster.local.:8086")
    );
    assert_eq!(
        env_of(proxy, "PYLON_IDENTITY_NAME"),
        Some("$(_pod_sa).$(PYLON_NAMESPACE).serviceaccount.identity.pylon.cluster.local")
    );
    assert_eq!(proxy["resources"]["limits"]["cpu"].as_str(), Some("1"));
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(proxy["securityContext"]["runAsUser"].as_u64(), Some(2102));
    assert_eq!(
        proxy["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let init = &spec["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "init",
            "--inbound-port",
            "4143",
            "--outbound-port",
            "4140",
            "--proxy-uid",
            "2102",
            "--skip-inbound-ports",
            "4190,4191",
            "--skip-outbound-ports",
            "3306"
        ]
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        yaml("[NET_ADMIN, NET_RAW]")
    );
    assert_eq!(names(&spec["volumes"]), ["pylon-identity-token"]);
    let labels = &template(&d)["metadata"]["labels"];
    assert_eq!(labels["pylon.io/proxy-deployment"].as_str(), Some("web"));
    assert_eq!(labels["pylon.io/workload-ns"].as_str(), Some("shop"));
    assert_eq!(
        labels["app"].as_str(),
        Some("web"),
        "the pod's own labels stay"
    );
}

#[test]
fn injection_is_idempotent_and_uninjection_restores_the_input() {
    let original = yaml(DEPLOYMENT);
    let mut once = original.clone();
    inject(&mut once, &config()).expect("inject");
    let mut twice = once.clone();
    inject(&mut twice, &config()).expect("inject again");
    assert_eq!(once, twice);
    let mut back = twice;
    let notes = uninject(&mut back).expect("uninject");
    assert_eq!(notes[0].outcome, Outcome::Uninjected);
    assert_eq!(back, original);
    let notes = uninject(&mut back).expect("uninject again");
    assert!(matches!(notes[0].outcome, Outcome::Skipped(_)));
}

#[test]
fn without_native_sidecars_the_proxy_is_the_first_container() {
    let mut c = config();
    c.native_sidecar = false;
    c.trust_anchors_pem = None;
    let mut d = yaml(DEPLOYMENT);
    inject(&mut d, &c).expect("inject");
    let spec = &template(&d)["spec"];
    assert_eq!(names(&spec["initContainers"]), ["pylon-init"]);
    assert_eq!(names(&spec["containers"]), ["pylon-proxy", "app"]);
    assert!(spec["containers"][0].get("restartPolicy").is_none());
    // No trust anchors: no identity, no token volume.
    assert!(spec.get("volumes").is_none());
    assert_eq!(env_of(&spec["containers"][0], "PYLON_IDENTITY_ADDR"), None);
}

#[test]
fn opted_out_host_network_and_unknown_objects_pass_through() {
    let disabled = DEPLOYMENT.replace(
        "config.pylon.io/proxy-log-level: debug",
        "linkerd.io/inject: disabled",
    );
    for (input, why) in [
        (disabled, "injection disabled by annotation"),
        (
            DEPLOYMENT.replace("serviceAccountName: web", "hostNetwork: true"),
            "host-network",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n".to_string(),
            "no pod template",
        ),
    ] {
        let original = yaml(&input);
        let mut v = original.clone();
        let notes = inject(&mut v, &config()).expect("inject");
        assert_eq!(v, original, "{input}");
        match &notes[0].outcome {
            Outcome::Skipped(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn pods_cronjobs_and_lists_are_injected_too() {
    let list = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: solo}
  spec: {containers: [{name: app, image: a}]}
- apiVersion: batch/v1
  kind: CronJob
  metadata: {name: nightly, namespace: ops}
  spec:
    schedule: "0 3 * * *"
    jobTemplate:
      spec:
        template:
          spec: {restartPolicy: Never, containers: [{name: job, image: j}]}
"#;
    let mut v = yaml(list);
    let notes = inject(&mut v, &config()).expect("inject");
    let outcomes: Vec<String> = notes.iter().map(ToString::to_string).collect();
    assert_eq!(
        outcomes,
        ["Pod solo: injected", "CronJob ops/nightly: injected"]
    );
    assert_eq!(
        names(&v["items"][0]["spec"]["initContainers"]),
        ["pylon-init", "pylon-proxy"]
    );
    let job = &v["items"][1]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(
        names(&job["spec"]["initContainers"]),
        ["pylon-init", "pylon-proxy"]
    );
    assert_eq!(
        job["metadata"]["labels"]["pylon.io/proxy-cronjob"].as_str(),
        Some("nightly")
    );
}

#[test]
fn a_malformed_object_is_an_error_naming_the_field() {
    let mut v = yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {template: {spec: {containers: oops}}}\n",
    );
    let err = inject(&mut v, &config()).expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "Deployment web: spec.containers: must be a list"
    );
}

#[test]
fn native_sidecars_from_1_29() {
    assert!(supports_native_sidecars("1.29"));
    assert!(supports_native_sidecars("v1.33.2"));
    assert!(supports_native_sidecars("1.30+"));
    assert!(!supports_native_sidecars("1.28.9"));
    assert!(!supports_native_sidecars("garbage"));
}

#[test]
fn a_pod_names_its_workload_from_its_owner() {
    let mut pod = yaml(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: web-5d8f7-\n  labels: {pod-template-hash: 5d8f7}\n  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f7, uid: u, controller: true}]\nspec: {containers: [{name: app, image: a}]}\n",
    );
    inject(&mut pod, &config()).expect("inject");
    assert_eq!(
        pod["metadata"]["labels"]["pylon.io/proxy-deployment"].as_str(),
        Some("web")
    );
    assert_eq!(
        env_of(&pod["spec"]["initContainers"][1], "PYLON_WORKLOAD"),
        Some("deployment/web")
    );
}
