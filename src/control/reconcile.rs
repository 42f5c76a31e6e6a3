//! The reconciler (pure, no I/O): what a new configuration means for the resources being served.
//! Called by the control loop on the main thread.

use std::collections::BTreeMap;

use crate::device::Resource;

/// What to do to go from the resources served to the resources wanted.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Served but no longer wanted, by resource name, in name order.
    pub remove: Vec<String>,
    /// Wanted and not served, in the order the configuration gives them.
    pub add: Vec<Resource>,
    /// Served, wanted, and configured differently now, in the configuration's order.
    pub update: Vec<Resource>,
}

/// Compares what is served (by resource name) with what is wanted. Resources are matched by
/// their resource name only; one configured exactly as before is left alone.
pub fn plan<'a>(
    current: impl IntoIterator<Item = (&'a str, &'a Resource)>,
    wanted: Vec<Resource>,
) -> Plan {
    let current: BTreeMap<&str, &Resource> = current.into_iter().collect();
    let mut plan = Plan {
        remove: current
            .keys()
            .filter(|name| !wanted.iter().any(|w| w.resource_name == **name))
            .map(|name| (*name).to_owned())
            .collect(),
        ..Plan::default()
    };
    for resource in wanted {
        match current.get(resource.resource_name.as_str()) {
            None => plan.add.push(resource),
            Some(now) if **now != resource => plan.update.push(resource),
            Some(_) => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Permissions;
    use std::path::Path;

    fn builtin(name: &str, count: u32) -> Resource {
        Resource::builtin(name, Path::new("/dev"), count, Permissions::default()).unwrap()
    }

    fn names(resources: &[Resource]) -> Vec<&str> {
        resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn adds_removes_and_updates_by_resource_name() {
        let served = [builtin("kvm", 10), builtin("tun", 10), builtin("fuse", 10)];
        let current = served.iter().map(|r| (r.resource_name.as_str(), r));
        let plan = plan(
            current,
            vec![
                builtin("vhost-net", 1),
                builtin("tun", 10),
                builtin("kvm", 20),
            ],
        );
        assert_eq!(plan.remove, ["devices.anza-labs.dev/fuse"]);
        assert_eq!(names(&plan.add), ["vhost-net"]);
        assert_eq!(names(&plan.update), ["kvm"]);
        assert_eq!(plan.update[0].count, 20);
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let served = [builtin("kvm", 10), builtin("tun", 3)];
        let current = served.iter().map(|r| (r.resource_name.as_str(), r));
        let plan = plan(current, vec![builtin("tun", 3), builtin("kvm", 10)]);
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn an_empty_configuration_removes_everything_and_an_empty_start_adds_everything() {
        let served = [builtin("kvm", 10), builtin("tun", 3)];
        let current = served.iter().map(|r| (r.resource_name.as_str(), r));
        let plan = plan(current, vec![]);
        assert_eq!(
            plan.remove,
            ["devices.anza-labs.dev/kvm", "devices.anza-labs.dev/tun"]
        );
        let plan = super::plan([], vec![builtin("tun", 3), builtin("kvm", 1)]);
        assert_eq!(
            names(&plan.add),
            ["tun", "kvm"],
            "in the configuration's order"
        );
        assert!(plan.remove.is_empty() && plan.update.is_empty());
    }
}
