//! The Argo CD health checks in `argocd/resource_customizations/trellis.dev/<Kind>/`, run under
//! a real Lua 5.1 (Argo CD's gopher-lua implements 5.1) with Argo CD's calling convention: the
//! object as the global `obj`, only the base and table libraries, a one-second budget, and a
//! returned table whose `status` (one of Argo CD's health codes) and `message` must equal the
//! case in `health_test.yaml` exactly, as Argo CD's own `TestLuaHealthScript` compares them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, LuaOptions, StdLib, VmState};
use serde_json::Value;

/// Argo CD's `luaVMTimeout`.
const BUDGET: Duration = Duration::from_secs(1);
/// The health codes Argo CD accepts from a script; anything else becomes Unknown there.
const CODES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];
const KINDS: [&str; 3] = ["Mesh", "PeerAuthentication", "TrafficPolicy"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("argocd/resource_customizations/trellis.dev")
}

#[derive(Debug, PartialEq)]
struct Health {
    status: String,
    message: String,
}

/// Argo CD's `decodeValue`: maps and lists become tables (lists 1-based), numbers Lua numbers,
/// null nil.
fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<mlua::Value> {
    Ok(match v {
        Value::Null => mlua::Value::Nil,
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Number(n) => mlua::Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => mlua::Value::String(lua.create_string(s)?),
        Value::Array(a) => {
            let t = lua.create_table()?;
            for (i, x) in a.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
        Value::Object(o) => {
            let t = lua.create_table()?;
            for (k, x) in o {
                t.raw_set(k.as_str(), to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
    })
}

/// Runs a health script the way Argo CD's `ExecuteHealthLua` does.
fn run(script: &str, obj: &Value) -> Result<Health, String> {
    let lua = Lua::new_with(StdLib::TABLE, LuaOptions::default()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    lua.set_hook(
        HookTriggers::new().every_nth_instruction(1000),
        move |_, _| {
            if start.elapsed() > BUDGET {
                Err(mlua::Error::runtime(
                    "the health check exceeded Argo CD's one-second budget",
                ))
            } else {
                Ok(VmState::Continue)
            }
        },
    )
    .map_err(|e| e.to_string())?;
    let o = to_lua(&lua, obj).map_err(|e| e.to_string())?;
    lua.globals().set("obj", o).map_err(|e| e.to_string())?;
    let ret: mlua::Value = lua
        .load(script)
        .set_name("health.lua")
        .eval()
        .map_err(|e| e.to_string())?;
    let mlua::Value::Table(t) = ret else {
        return Err(format!(
            "expect table output from Lua script, not {}",
            ret.type_name()
        ));
    };
    let field = |k: &str| -> Result<String, String> {
        Ok(t.get::<Option<String>>(k)
            .map_err(|e| format!("{k}: {e}"))?
            .unwrap_or_default())
    };
    let health = Health {
        status: field("status")?,
        message: field("message")?,
    };
    if !CODES.contains(&health.status.as_str()) {
        return Err(format!(
            "status {:?} is not an Argo CD health code",
            health.status
        ));
    }
    Ok(health)
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `health_test.yaml` case of `kind` run against `script`; the failures, one line each.
fn failures(kind: &str, script: &str) -> Vec<String> {
    let kdir = dir().join(kind);
    let tests = yaml(&kdir.join("health_test.yaml"));
    let mut out = Vec::new();
    for case in tests["tests"].as_array().unwrap() {
        let input = case["inputPath"].as_str().unwrap();
        let want = Health {
            status: case["healthStatus"]["status"].as_str().unwrap().into(),
            message: case["healthStatus"]["message"]
                .as_str()
                .unwrap_or_default()
                .into(),
        };
        match run(script, &yaml(&kdir.join(input))) {
            Ok(have) if have == want => {}
            Ok(have) => out.push(format!("{kind}/{input}: want {want:?}, got {have:?}")),
            Err(e) => out.push(format!("{kind}/{input}: {e}")),
        }
    }
    out
}

fn script(kind: &str) -> String {
    std::fs::read_to_string(dir().join(kind).join("health.lua")).unwrap()
}

#[test]
fn every_health_test_case_passes() {
    let kinds: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(kinds, KINDS.iter().map(|k| k.to_string()).collect());
    let mut all = Vec::new();
    for kind in KINDS {
        all.extend(failures(kind, &script(kind)));
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn every_kind_covers_each_health_and_every_testdata_file_is_a_case() {
    for kind in KINDS {
        let kdir = dir().join(kind);
        let tests = yaml(&kdir.join("health_test.yaml"));
        let cases = tests["tests"].as_array().unwrap();
        let statuses: BTreeSet<&str> = cases
            .iter()
            .map(|c| c["healthStatus"]["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            BTreeSet::from(["Degraded", "Healthy", "Progressing"]),
            "{kind}"
        );
        let used: BTreeSet<String> = cases
            .iter()
            .map(|c| c["inputPath"].as_str().unwrap().to_string())
            .collect();
        for e in std::fs::read_dir(kdir.join("testdata")).unwrap() {
            let name = format!("testdata/{}", e.unwrap().file_name().to_string_lossy());
            assert!(used.contains(&name), "{kind}/{name} is no case");
        }
    }
}

#[test]
fn a_script_broken_on_purpose_fails_its_cases() {
    for kind in KINDS {
        let good = script(kind);
        // A failure reported as healthy.
        let broken = good.replace(
            "hs.status = \"Degraded\"\nhs.message",
            "hs.status = \"Healthy\"\nhs.message",
        );
        assert_ne!(broken, good, "{kind}: the mutation did not apply");
        let f = failures(kind, &broken);
        assert!(
            f.iter()
                .any(|l| l.contains("want Health { status: \"Degraded\"")),
            "{kind}: {f:#?}"
        );
        // Health before the operator has seen the change.
        let broken = good.replace("observed < generation", "observed > generation");
        let f = failures(kind, &broken);
        assert!(
            f.iter().any(|l| l.contains("generation_not_observed")),
            "{kind}: {f:#?}"
        );
        // A syntax error fails every case.
        let f = failures(kind, &good.replace("return hs\nend", "return hs\nen"));
        assert!(!f.is_empty(), "{kind}");
    }
}

#[test]
fn the_sandbox_is_argo_cds() {
    let obj = serde_json::json!({"metadata": {"name": "x"}});
    // The budget stops a script that never returns.
    let start = Instant::now();
    let err = run("while true do end", &obj).unwrap_err();
    assert!(err.contains("one-second budget"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Base and table only: the string, os and math libraries are absent, as the scripts assume.
    for lib in [
        "string.upper('x')",
        "os.time()",
        "math.floor(1)",
        "('x'):upper()",
    ] {
        let err = run(&format!("return {{status = {lib}}}"), &obj).unwrap_err();
        assert!(
            err.contains("a nil value") || err.contains("attempt to index a string value"),
            "{lib}: {err}"
        );
    }
    let ok = run(
        "local t = {} table.insert(t, obj.metadata.name) return {status = 'Healthy', message = t[1] .. tostring(#t)}",
        &obj,
    )
    .unwrap();
    assert_eq!(ok.message, "x1");
    // What Argo CD refuses.
    assert!(
        run("return 'Healthy'", &obj)
            .unwrap_err()
            .contains("expect table")
    );
    assert!(
        run("return {status = 'Fine'}", &obj)
            .unwrap_err()
            .contains("not an Argo CD health code")
    );
}

#[test]
fn the_scripts_use_only_the_base_and_table_libraries() {
    for kind in KINDS {
        let s = script(kind);
        for lib in [
            "string.",
            "os.",
            "math.",
            "io.",
            "require",
            "debug.",
            "coroutine.",
        ] {
            assert!(!s.contains(lib), "{kind}/health.lua uses {lib}");
        }
    }
}

#[test]
fn the_argocd_cm_patch_carries_the_same_scripts() {
    let cm = yaml(&dir().join("../../argocd-cm.yaml"));
    for kind in KINDS {
        let key = format!("resource.customizations.health.trellis.dev_{kind}");
        assert_eq!(
            cm["data"][&key].as_str(),
            Some(script(kind).as_str()),
            "argocd/argocd-cm.yaml is out of date: run hack/argocd-cm.sh"
        );
    }
}
