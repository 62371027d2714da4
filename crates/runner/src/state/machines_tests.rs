//! Tests of the machines and the choice of a machine.

use super::*;

fn machine(
    name: &str,
    systems: &[&str],
    features: &[&str],
    mandatory: &[&str],
    speed: f32,
    jobs: u32,
) -> Machine {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
    Machine {
        name: name.into(),
        connection: format!("{name}-conn"),
        instance_id: format!("{name}-instance"),
        systems: s(systems),
        supported_features: s(features),
        mandatory_features: s(mandatory),
        max_jobs: jobs,
        speed_factor: speed,
        running: HashSet::new(),
        uploading: HashSet::new(),
        load1: 0.0,
        free_disk: None,
        substituter_timeouts: 0,
        link: BuilderLink::detached(),
        follows_local_jobs: true,
    }
}

fn f(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn features_required_and_mandatory_decide_support() {
    let kvm = machine("kvm", &["x86_64-linux"], &["kvm"], &[], 1.0, 1);
    let bench = machine("bench", &["x86_64-linux"], &[], &["benchmark"], 1.0, 1);
    assert!(kvm.supports("x86_64-linux", &f(&["kvm"])));
    assert!(kvm.supports("x86_64-linux", &[]));
    assert!(!kvm.supports("aarch64-linux", &[]));
    assert!(kvm.supports("builtin", &[]));
    assert!(
        !bench.supports("x86_64-linux", &[]),
        "a mandatory feature must be required"
    );
    assert!(bench.supports("x86_64-linux", &f(&["benchmark"])));
}

#[test]
fn the_fastest_free_machine_wins_and_full_ones_are_busy() {
    let mut ms = Machines::default();
    ms.register_ok(machine("slow", &["x86_64-linux"], &[], &[], 1.0, 1));
    ms.register_ok(machine("fast", &["x86_64-linux"], &[], &[], 4.0, 1));
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, Instant::now(), &[])
            .unwrap()
            .name,
        "fast"
    );
    ms.get_mut("fast").unwrap().running.insert(Uuid::new_v4());
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, Instant::now(), &[])
            .unwrap()
            .name,
        "slow"
    );
    ms.get_mut("slow").unwrap().running.insert(Uuid::new_v4());
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, Instant::now(), &[])
            .unwrap_err(),
        NoMachine::Busy
    );
    assert_eq!(
        ms.choose("riscv64-linux", &[], 0, Instant::now(), &[])
            .unwrap_err(),
        NoMachine::Unsupported
    );
}

#[test]
fn between_equal_machines_the_less_loaded_one_wins() {
    let mut ms = Machines::default();
    let mut busy = machine("busy", &["x86_64-linux"], &[], &[], 1.0, 2);
    busy.load1 = 8.0;
    let mut idle = machine("idle", &["x86_64-linux"], &[], &[], 1.0, 2);
    idle.load1 = 0.5;
    ms.register_ok(busy);
    ms.register_ok(idle);
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, Instant::now(), &[])
            .unwrap()
            .name,
        "idle"
    );
    ms.get_mut("idle").unwrap().running.insert(Uuid::new_v4());
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, Instant::now(), &[])
            .unwrap()
            .name,
        "busy",
        "free slots count before reported load"
    );
}

#[test]
fn a_machine_short_of_disk_gets_nothing() {
    let mut ms = Machines::default();
    let mut m = machine("m", &["x86_64-linux"], &[], &[], 1.0, 2);
    m.free_disk = Some(10);
    ms.register_ok(m);
    assert_eq!(
        ms.choose("x86_64-linux", &[], 100, Instant::now(), &[])
            .unwrap_err(),
        NoMachine::Busy
    );
    assert!(
        ms.choose("x86_64-linux", &[], 5, Instant::now(), &[])
            .is_ok()
    );
}

impl Machines {
    fn register_ok(&mut self, m: Machine) -> Option<Machine> {
        self.register(m).expect("a name of its own")
    }
}

#[test]
fn a_stale_connection_does_not_unregister_the_new_one() {
    let mut ms = Machines::default();
    let now = Instant::now();
    ms.register_ok(machine("m", &["x86_64-linux"], &[], &[], 1.0, 1));
    let mut again = machine("m", &["x86_64-linux"], &[], &[], 1.0, 1);
    again.connection = "second".into();
    assert!(ms.register_ok(again).is_some());
    assert!(ms.unregister("m", "m-conn", now).is_none());
    assert!(ms.unregister("m", "second", now).is_some());
}

#[test]
fn another_builder_cannot_take_a_connected_machines_name() {
    let mut ms = Machines::default();
    ms.register_ok(machine("m", &["x86_64-linux"], &[], &[], 1.0, 1));
    let mut impostor = machine("m", &["x86_64-linux"], &[], &[], 1.0, 1);
    impostor.instance_id = "another process".into();
    impostor.connection = "second".into();
    let refused = ms.register(impostor).unwrap_err();
    assert_eq!(refused, NameTaken("m".into()));
    assert_eq!(
        ms.get("m").unwrap().connection,
        "m-conn",
        "the first keeps it"
    );
}

#[test]
fn a_machine_that_went_away_still_counts_as_supporting_its_systems() {
    let mut ms = Machines::default();
    let now = Instant::now();
    let day = Duration::from_secs(86400);
    ms.register_ok(machine("arm", &["aarch64-linux"], &["big"], &[], 1.0, 1));
    ms.register_ok(machine("x86", &["x86_64-linux"], &[], &[], 1.0, 1));
    ms.unregister("arm", "arm-conn", now);
    assert!(ms.supports_any("aarch64-linux", &f(&["big"])));
    assert!(!ms.supports_any("riscv64-linux", &[]));
    assert_eq!(
        ms.availability("aarch64-linux", &[], 0, now),
        Availability::Away {
            machines: vec!["arm".into()]
        }
    );
    assert_eq!(ms.next_forgotten(day), Some(now + day));
    ms.forget_departed(now + day, day);
    assert!(!ms.supports_any("aarch64-linux", &[]));
    assert_eq!(
        ms.availability("aarch64-linux", &[], 0, now),
        Availability::Unsupported
    );
}

#[test]
fn a_retry_goes_to_another_machine_when_there_is_one() {
    let mut ms = Machines::default();
    ms.register_ok(machine("fast", &["x86_64-linux"], &[], &[], 4.0, 1));
    ms.register_ok(machine("slow", &["x86_64-linux"], &[], &[], 1.0, 1));
    let now = Instant::now();
    let avoid = vec!["fast".to_owned()];
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, now, &avoid).unwrap().name,
        "slow"
    );
    ms.get_mut("slow").unwrap().running.insert(Uuid::new_v4());
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, now, &avoid).unwrap().name,
        "fast",
        "the failed machine rather than nothing"
    );
}

#[test]
fn a_machine_that_keeps_failing_rests_and_a_success_ends_it() {
    let mut ms = Machines::default();
    ms.register_ok(machine("flaky", &["x86_64-linux"], &[], &[], 1.0, 1));
    let now = Instant::now();
    let rest = |n: u32| (n >= 2).then(|| Duration::from_secs(60 * n as u64));
    assert_eq!(ms.record_failure("flaky", now, rest), None);
    assert_eq!(
        ms.record_failure("flaky", now, rest),
        Some(Duration::from_secs(120))
    );
    assert_eq!(ms.health("flaky").consecutive_failures, 2);
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, now, &[]).unwrap_err(),
        NoMachine::Busy,
        "rested, not unsupported"
    );
    assert_eq!(ms.next_rest_end(now), Some(now + Duration::from_secs(120)));
    let later = now + Duration::from_secs(121);
    assert!(ms.choose("x86_64-linux", &[], 0, later, &[]).is_ok());
    ms.record_success("flaky");
    assert_eq!(ms.health("flaky"), Health::default());
}

#[test]
fn a_drained_machine_gets_nothing_new_and_says_so() {
    let mut ms = Machines::default();
    ms.register_ok(machine("m1", &["x86_64-linux"], &[], &[], 1.0, 1));
    let now = Instant::now();
    ms.set_drained("m1", true);
    assert_eq!(
        ms.choose("x86_64-linux", &[], 0, now, &[]).unwrap_err(),
        NoMachine::Busy,
        "drained, not unsupported"
    );
    assert_eq!(
        ms.availability("x86_64-linux", &[], 0, now),
        Availability::Drained
    );
    ms.set_drained("m1", false);
    assert_eq!(
        ms.availability("x86_64-linux", &[], 0, now),
        Availability::Free
    );
}

#[test]
fn availability_names_each_reason_a_step_waits() {
    let mut ms = Machines::default();
    let now = Instant::now();
    assert_eq!(
        ms.availability("x86_64-linux", &[], 0, now),
        Availability::Unsupported
    );
    ms.register_ok(machine("m1", &["x86_64-linux"], &[], &[], 1.0, 1));
    ms.get_mut("m1").unwrap().running.insert(Uuid::new_v4());
    assert_eq!(
        ms.availability("x86_64-linux", &[], 0, now),
        Availability::NoFreeSlot {
            machines: 1,
            slots: 1
        }
    );
    let rest = |_| Some(Duration::from_secs(60));
    ms.record_failure("m1", now, rest);
    assert_eq!(
        ms.availability("x86_64-linux", &[], 0, now),
        Availability::Rested {
            until: now + Duration::from_secs(60)
        }
    );
}

#[test]
fn a_step_goes_where_most_of_its_inputs_were_built_while_that_machine_has_a_slot() {
    let mut ms = Machines::default();
    ms.register_ok(machine("fast", &["x86_64-linux"], &[], &[], 4.0, 2));
    ms.register_ok(machine("near", &["x86_64-linux"], &[], &[], 1.0, 1));
    ms.register_ok(machine("some", &["x86_64-linux"], &[], &[], 1.0, 1));
    let now = Instant::now();
    let holding = vec![("some".to_owned(), 1), ("near".to_owned(), 2)];
    let choose = |ms: &Machines, avoid: &[String], planned: &HashMap<String, u32>| {
        ms.choose_with("x86_64-linux", &[], 0, now, avoid, &holding, planned, None)
            .map(|m| m.name.clone())
    };
    let none = HashMap::new();
    assert_eq!(
        choose(&ms, &[], &none).unwrap(),
        "near",
        "holding more inputs beats speed"
    );
    let near_taken = HashMap::from([("near".to_owned(), 1)]);
    assert_eq!(
        choose(&ms, &[], &near_taken).unwrap(),
        "some",
        "a full machine does not wait: the next holder takes it"
    );
    assert_eq!(
        choose(&ms, &f(&["near"]), &none).unwrap(),
        "some",
        "a machine the step failed on is still avoided"
    );
    let holders_taken = HashMap::from([("near".to_owned(), 1), ("some".to_owned(), 1)]);
    assert_eq!(
        choose(&ms, &[], &holders_taken).unwrap(),
        "fast",
        "with every holder full, the usual order"
    );
}
