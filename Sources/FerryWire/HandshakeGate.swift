// The server side of accepting peers: every connection a listener accepts
// runs the handshake, and at most `WireLimits.maxPendingHandshakes` of them
// at a time. Unauthenticated peers cost us a socket, a task and at most one
// `handshakeMaxFrame` buffer each (the stream transport starts at that limit
// from the first byte), for at most `handshakeTimeout`; the cap bounds how
// many of those a flood of half-open connections can hold. The seeder and
// the hub accept through here (Protocols/wire.md § Limits).

import Synchronization

extension Listener {
    /// Accepts connections until the listener closes and runs the server
    /// handshake on each, at most `maxPending` at a time. A connection over
    /// the cap is answered Reject(`busy`) and closed at once, without a
    /// handshake. `authenticated` runs, on a task of its own, for each channel
    /// that completes the handshake (its slot is free again by then);
    /// `refused` for each connection that does not, and for failed accepts.
    public func serveHandshakes(credentials: Credentials, options: SecureChannelOptions = .init(),
                                maxPending: Int = WireLimits.maxPendingHandshakes,
                                authenticated: @escaping @Sendable (SecureChannel) async -> Void,
                                refused: @escaping @Sendable (_ peer: String, _ error: any Error) -> Void) async {
        let slots = HandshakeSlots(limit: maxPending)
        while true {
            let transport: FrameTransport
            do {
                transport = try await accept()
            } catch let error as SocketError {
                guard case .acceptFailed = error else { return }   // the listener closed
                // Out of descriptors or similar: say so, and keep serving
                // once a connection has had time to end.
                refused(endpoint.description, error)
                try? await Task.sleep(for: .milliseconds(100))
                continue
            } catch {
                return   // cancelled, or the loop shut down
            }
            let peer = transport.peerDescription
            guard slots.take() else {
                refused(peer, HandshakeError(failure: .busy, rejectedByPeer: false, peer: peer,
                                             detail: "\(maxPending) connections are already in their handshake; refused \(peer) at once"))
                Task {
                    // Best effort: a few bytes, written directly; then a graceful close.
                    try? await transport.send(Reject.frame(.busy, "too many connections in their handshake; retry in a few seconds"))
                    transport.close()
                }
                continue
            }
            Task {
                let channel: SecureChannel
                do {
                    channel = try await SecureChannel.server(over: transport, credentials: credentials, options: options)
                } catch {
                    slots.release()
                    transport.close()
                    refused(peer, error)
                    return
                }
                slots.release()
                await authenticated(channel)
            }
        }
    }
}

/// Counts handshakes in progress against a limit.
final class HandshakeSlots: Sendable {
    let limit: Int
    private let used = Atomic<Int>(0)

    init(limit: Int) { self.limit = limit }

    /// Takes a slot; false when all `limit` are in use.
    func take() -> Bool {
        var current = used.load(ordering: .relaxed)
        while current < limit {
            let (exchanged, original) = used.compareExchange(expected: current, desired: current + 1, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            current = original
        }
        return false
    }

    func release() { used.subtract(1, ordering: .acquiringAndReleasing) }

    var inUse: Int { used.load(ordering: .relaxed) }
}
