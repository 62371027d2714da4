//! Priority classes of submissions, mapped onto Hydra's two priorities.
//!
//! The global priority orders everything (Hydra's "bump" raises it); the
//! local one orders within a jobset. Classes are 10 points apart and the
//! dispatcher ages waiting steps by a point per `priority_aging_secs`, so a
//! background step overtakes fresh normal work after ten periods and fresh
//! interactive work after twenty: nothing waits for ever.

use hydra_proto::client::PriorityClass as Wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorityClass {
    Interactive,
    Normal,
    Background,
}

impl PriorityClass {
    pub fn from_wire(p: Wire) -> PriorityClass {
        match p {
            Wire::Interactive => PriorityClass::Interactive,
            Wire::Unspecified | Wire::Normal => PriorityClass::Normal,
            Wire::Background => PriorityClass::Background,
        }
    }

    pub fn to_wire(self) -> Wire {
        match self {
            PriorityClass::Interactive => Wire::Interactive,
            PriorityClass::Normal => Wire::Normal,
            PriorityClass::Background => Wire::Background,
        }
    }

    /// The `priority_class` column.
    pub fn as_str(self) -> &'static str {
        match self {
            PriorityClass::Interactive => "interactive",
            PriorityClass::Normal => "normal",
            PriorityClass::Background => "background",
        }
    }

    pub fn parse(s: &str) -> Option<PriorityClass> {
        match s {
            "interactive" => Some(PriorityClass::Interactive),
            "normal" => Some(PriorityClass::Normal),
            "background" => Some(PriorityClass::Background),
            _ => None,
        }
    }

    /// Builds.globalPriority.
    pub fn global_priority(self) -> i32 {
        match self {
            PriorityClass::Interactive => 10,
            PriorityClass::Normal => 0,
            PriorityClass::Background => -10,
        }
    }

    /// Builds.priority (Hydra's evaluator writes 100 by default).
    pub fn local_priority(self) -> i32 {
        match self {
            PriorityClass::Interactive => 200,
            PriorityClass::Normal => 100,
            PriorityClass::Background => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_order_both_priorities_and_round_trip() {
        let all = [
            PriorityClass::Interactive,
            PriorityClass::Normal,
            PriorityClass::Background,
        ];
        for w in all.windows(2) {
            assert!(w[0].global_priority() > w[1].global_priority());
            assert!(w[0].local_priority() > w[1].local_priority());
        }
        for c in all {
            assert_eq!(PriorityClass::parse(c.as_str()), Some(c));
            assert_eq!(PriorityClass::from_wire(c.to_wire()), c);
        }
        assert_eq!(
            PriorityClass::from_wire(Wire::Unspecified),
            PriorityClass::Normal
        );
    }
}
