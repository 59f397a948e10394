//! The in-flight window of a QoS 1 or 2 publisher: which packet identifiers are
//! awaiting which acknowledgement, and how many more messages may be sent.
//!
//! Sans-IO: the publisher asks [`Window::allocate`] for an identifier before each
//! PUBLISH and feeds every acknowledgement to [`Window::on_ack`], which says what
//! to send back (PUBREL after PUBREC) and whether the acknowledgement was expected.

use tessera_proto::{Packet, QoS, ReasonCode};

/// Packet identifiers: 1..=65535.
const PACKET_IDS: usize = 1 << 16;

/// Where one packet identifier stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdState {
    Free,
    /// PUBLISH sent; PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Published,
    /// PUBREC received and PUBREL sent; PUBCOMP awaited (QoS 2).
    Released,
}

/// What an acknowledgement means to the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The message is done; its slot is free again.
    Completed,
    /// The broker refused the message (a v5 reason code of 0x80 or above); its slot
    /// is free again but the message will not be delivered.
    Rejected(ReasonCode),
    /// PUBREC: send PUBREL for this identifier.
    Release(u16),
    /// An acknowledgement for an identifier not awaiting it: a broker bug.
    Unexpected(u16),
    /// Not an acknowledgement.
    NotAnAck,
}

/// The window of one connection.
#[derive(Debug)]
pub struct Window {
    qos: QoS,
    state: Vec<IdState>,
    in_flight: usize,
    limit: usize,
    last_id: u16,
}

impl Window {
    /// A window of at most `limit` messages (1..=65535) at `qos` (1 or 2).
    pub fn new(qos: QoS, limit: usize) -> Window {
        assert!(qos != QoS::AtMostOnce, "QoS 0 has no window");
        assert!((1..PACKET_IDS).contains(&limit), "window {limit}");
        Window {
            qos,
            state: vec![IdState::Free; PACKET_IDS],
            in_flight: 0,
            limit,
            last_id: 0,
        }
    }

    /// Messages awaiting completion.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages that may still be sent before the window is full.
    pub fn room(&self) -> usize {
        self.limit - self.in_flight
    }

    /// A free packet identifier for the next PUBLISH, or `None` when the window is
    /// full.
    pub fn allocate(&mut self) -> Option<u16> {
        if self.in_flight == self.limit {
            return None;
        }
        // The window is smaller than the identifier space, so a free one exists.
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            let slot = &mut self.state[self.last_id as usize];
            if *slot == IdState::Free {
                *slot = IdState::Published;
                self.in_flight += 1;
                return Some(self.last_id);
            }
        }
    }

    /// Applies an acknowledgement received from the broker.
    pub fn on_ack(&mut self, packet: &Packet) -> AckOutcome {
        let (id, reason, from) = match (packet, self.qos) {
            (Packet::PubAck(a), QoS::AtLeastOnce) => {
                (a.packet_id, a.reason_code, IdState::Published)
            }
            (Packet::PubRec(a), QoS::ExactlyOnce) => {
                (a.packet_id, a.reason_code, IdState::Published)
            }
            (Packet::PubComp(a), QoS::ExactlyOnce) => {
                (a.packet_id, a.reason_code, IdState::Released)
            }
            (Packet::PubAck(a), _) => return AckOutcome::Unexpected(a.packet_id),
            (Packet::PubRec(a), _) => return AckOutcome::Unexpected(a.packet_id),
            (Packet::PubComp(a), _) => return AckOutcome::Unexpected(a.packet_id),
            _ => return AckOutcome::NotAnAck,
        };
        let slot = &mut self.state[id as usize];
        let is_pubrec = matches!(packet, Packet::PubRec(_));
        // A repeated PUBREC for a message already released is answered again.
        if is_pubrec && *slot == IdState::Released && !reason.is_error() {
            return AckOutcome::Release(id);
        }
        if *slot != from {
            return AckOutcome::Unexpected(id);
        }
        if is_pubrec && !reason.is_error() {
            *slot = IdState::Released;
            return AckOutcome::Release(id);
        }
        *slot = IdState::Free;
        self.in_flight -= 1;
        if reason.is_error() {
            AckOutcome::Rejected(reason)
        } else {
            AckOutcome::Completed
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_proto::{PubAck, PubComp, PubRec};

    use super::*;

    #[test]
    fn qos1_window_fills_and_drains() {
        let mut w = Window::new(QoS::AtLeastOnce, 2);
        assert_eq!(w.allocate(), Some(1));
        assert_eq!(w.allocate(), Some(2));
        assert_eq!(w.allocate(), None);
        assert_eq!(
            w.on_ack(&Packet::PubAck(PubAck::new(2))),
            AckOutcome::Completed
        );
        assert_eq!(
            w.on_ack(&Packet::PubAck(PubAck::new(2))),
            AckOutcome::Unexpected(2)
        );
        assert_eq!(w.allocate(), Some(3));
        assert_eq!(w.in_flight(), 2);
    }

    #[test]
    fn identifiers_wrap_and_skip_those_in_flight() {
        let mut w = Window::new(QoS::AtLeastOnce, 2);
        assert_eq!(w.allocate(), Some(1));
        for id in 2..=u16::MAX {
            assert_eq!(w.allocate(), Some(id));
            assert_eq!(
                w.on_ack(&Packet::PubAck(PubAck::new(id))),
                AckOutcome::Completed
            );
        }
        // 1 is still in flight, so the wrap skips it.
        assert_eq!(w.allocate(), Some(2));
    }

    #[test]
    fn qos2_needs_pubrec_then_pubcomp() {
        let mut w = Window::new(QoS::ExactlyOnce, 4);
        let id = w.allocate().unwrap();
        assert_eq!(
            w.on_ack(&Packet::PubComp(PubComp::new(id))),
            AckOutcome::Unexpected(id)
        );
        assert_eq!(
            w.on_ack(&Packet::PubRec(PubRec::new(id))),
            AckOutcome::Release(id)
        );
        assert_eq!(w.in_flight(), 1);
        assert_eq!(
            w.on_ack(&Packet::PubRec(PubRec::new(id))),
            AckOutcome::Release(id)
        );
        assert_eq!(
            w.on_ack(&Packet::PubComp(PubComp::new(id))),
            AckOutcome::Completed
        );
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn error_reason_frees_the_slot_as_rejected() {
        let mut w = Window::new(QoS::AtLeastOnce, 1);
        let id = w.allocate().unwrap();
        let mut nack = PubAck::new(id);
        nack.reason_code = ReasonCode::QuotaExceeded;
        assert_eq!(
            w.on_ack(&Packet::PubAck(nack)),
            AckOutcome::Rejected(ReasonCode::QuotaExceeded)
        );
        assert_eq!(w.room(), 1);
    }
}
