use std::sync::mpsc::{Receiver, channel};

use super::*;
use crate::vcpu::Pauser;

/// A control over a machine with no vCPUs (the gate parks nothing).
fn control() -> (Control, Receiver<VmEvent>) {
    let gate = Arc::new(Gate::new(
        Arc::new(Pauser::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    ));
    let (tx, rx) = channel();
    let telemetry = Arc::new(Telemetry::new(None, Duration::from_secs(1), 2, 64 << 20));
    (
        Control {
            telemetry,
            gate,
            epochs: None,
            events: Mutex::new(tx),
        },
        rx,
    )
}

fn req(method: &str, path: &str, body: &str) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        body: body.as_bytes().to_vec(),
    }
}

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn routes_answer_or_say_why_not() {
    let (ctl, _rx) = control();
    let stop = StopReply::default();
    let r = route(&req("GET", "/status", ""), &ctl, &stop);
    assert_eq!(r.status, 200);
    let v = body(&r);
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["store"], Value::Null);
    assert_eq!(v["current_epoch"], Value::Null);

    let r = route(&req("GET", "/nope", ""), &ctl, &stop);
    assert_eq!(r.status, 404);
    assert!(body(&r)["error"].as_str().unwrap().contains("/nope"));

    let r = route(&req("POST", "/status", ""), &ctl, &stop);
    assert_eq!(r.status, 405);
    assert_eq!(r.headers, vec![("Allow", "GET".to_string())]);

    for bad in ["{", "[1]", "{\"x\": 1}", "nonsense"] {
        let r = route(&req("PUT", "/pause", bad), &ctl, &stop);
        assert_eq!(r.status, 400, "{bad}");
        assert!(!ctl.gate.paused(), "a bad request paused the VM: {bad}");
    }
    let r = route(&req("PUT", "/checkpoint", ""), &ctl, &stop);
    assert_eq!(r.status, 409);
    assert!(body(&r)["error"].as_str().unwrap().contains("--no-store"));

    let r = route(&req("GET", "/openapi.yaml", ""), &ctl, &stop);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).starts_with("openapi: 3"));
}

#[test]
fn pause_and_resume_by_put_and_patch() {
    let (ctl, _rx) = control();
    let stop = StopReply::default();
    let r = route(&req("PUT", "/pause", ""), &ctl, &stop);
    assert_eq!(
        (r.status, body(&r)["state"].clone()),
        (200, json!("paused"))
    );
    assert!(ctl.gate.paused());
    let r = route(&req("PUT", "/pause", "{}"), &ctl, &stop);
    assert_eq!(body(&r)["changed"], false);
    let r = route(
        &req("PATCH", "/vm", "{\"state\": \"running\"}"),
        &ctl,
        &stop,
    );
    assert_eq!(
        (r.status, body(&r)["state"].clone()),
        (200, json!("running"))
    );
    assert!(!ctl.gate.paused());
    for bad in [
        "",
        "{\"state\": \"asleep\"}",
        "{\"state\": 1}",
        "{\"state\": \"paused\", \"x\": 0}",
    ] {
        let r = route(&req("PATCH", "/vm", bad), &ctl, &stop);
        assert_eq!(r.status, 400, "{bad}");
    }
    assert!(!ctl.gate.paused());
    let r = route(&req("PATCH", "/vm", "{\"state\": \"paused\"}"), &ctl, &stop);
    assert_eq!(r.status, 200);
    assert!(ctl.gate.paused());
    let r = route(&req("PUT", "/resume", ""), &ctl, &stop);
    assert_eq!(body(&r)["changed"], true);
}

#[test]
fn metrics_are_prometheus_text() {
    let (ctl, _rx) = control();
    ctl.telemetry.committed(
        &checkpoint::EpochInfo {
            epoch: 5,
            freeze_us: 1500,
            dirty_pages: 10,
            bytes: 50_000,
            ..Default::default()
        },
        crate::telemetry::LogState::default(),
    );
    let text = metrics::render(&ctl);
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP evm_") || line.starts_with("# TYPE evm_"),
                "{line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(name.starts_with("evm_"), "{line}");
        assert!(value == "NaN" || value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(text.contains("\nevm_last_committed_epoch 5\n"), "{text}");
    assert!(
        text.contains("\nevm_freeze_seconds{quantile=\"0.5\"} 0.001500\n"),
        "{text}"
    );
    assert!(text.contains("\nevm_freeze_seconds_count 1\n"), "{text}");
}

#[test]
fn serves_a_socket_and_stop_waits_for_the_final_epoch() {
    let dir = std::env::temp_dir().join(format!("evm-api-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    std::fs::write(dir.join("file"), b"x").unwrap();
    assert!(matches!(
        bind(&dir.join("file")),
        Err(ApiError::NotASocket(_))
    ));

    let (ctl, rx) = control();
    let server = ApiServer::spawn(bind(&path).unwrap(), ctl).unwrap();
    // A second evm on the same socket is refused while the first serves.
    assert!(matches!(bind(&path), Err(ApiError::InUse(_))));

    let v = client::json(&path, "GET", "/status", None, client::QUICK).unwrap();
    assert_eq!(v["state"], "running");
    // Garbage gets a 400 with a message, and the server goes on serving.
    let mut s = UnixStream::connect(&path).unwrap();
    std::io::Write::write_all(&mut s, b"\x16\x03\x01 hello\r\n\r\n").unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut s, &mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
    assert!(raw.contains("malformed HTTP request"), "{raw}");
    let e = client::json(&path, "PUT", "/pause", Some("{oops"), client::QUICK).unwrap_err();
    assert!(e.to_string().contains("malformed JSON body"), "{e}");
    assert!(client::json(&path, "GET", "/status", None, client::QUICK).is_ok());

    // PUT /stop: the main thread gets ApiStop, commits, answers.
    let stop = server.stop_reply();
    let main = std::thread::spawn(move || {
        assert_eq!(rx.recv().unwrap(), VmEvent::ApiStop);
        stop.stopped(Ok(Some(9)));
    });
    let v = client::json(&path, "PUT", "/stop", None, client::SLOW).unwrap();
    assert_eq!(v["final_epoch"], 9);
    main.join().unwrap();
    drop(server);
    assert!(!path.exists(), "the socket file outlived the server");
    let e = client::call(&path, "GET", "/status", None, client::QUICK).unwrap_err();
    assert!(matches!(e, client::ClientError::NoSocket(_)), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
