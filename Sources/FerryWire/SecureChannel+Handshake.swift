// The handshake that opens a `SecureChannel`: the client and server sides
// over a frame transport, bounded by the handshake timeout, with a Reject
// sent (best effort) when a step fails. The records that follow are in
// SecureChannel.swift; the messages themselves in Handshake.swift.

import Synchronization
import Glibc

extension SecureChannel {
    /// Runs the client (leecher) side of the handshake over `transport`.
    public static func client(over transport: FrameTransport, credentials: Credentials, options: SecureChannelOptions = .init()) async throws -> SecureChannel {
        transport.setMaxIncomingFrameSize(WireLimits.handshakeMaxFrame)
        let peer = transport.peerDescription
        var hs: ClientHandshake
        let hello: [UInt8]
        do {
            hs = try ClientHandshake(credentials: credentials, peer: peer, roles: options.roles, offerAES: options.allowAES,
                                     compression: options.compression)
            hello = try hs.hello()
        } catch { transport.close(); throw error }   // a configuration error: the peer must not wait for us
        let h = hs
        let keys = try await runHandshake(transport, options: options, peerRole: options.roles.server) { io in
            var hs = h
            try await io.send(hello)
            let m3 = try hs.handleServerHello(try await io.receive("ServerHello"))
            try await io.send(m3)
            return try hs.handleServerAccept(try await io.receive("ServerAccept"))
        }
        return try SecureChannel(transport: transport, keys: keys, options: options)
    }

    /// Runs the server (seeder) side of the handshake over `transport`.
    public static func server(over transport: FrameTransport, credentials: Credentials, options: SecureChannelOptions = .init()) async throws -> SecureChannel {
        transport.setMaxIncomingFrameSize(WireLimits.handshakeMaxFrame)
        let peer = transport.peerDescription
        let h: ServerHandshake
        do {
            h = try ServerHandshake(credentials: credentials, peer: peer, roles: options.roles, allowAES: options.allowAES,
                                    compression: options.compression)
        }
        catch { transport.close(); throw error }   // a configuration error: the peer must not wait for us
        let keys = try await runHandshake(transport, options: options, peerRole: options.roles.client) { io in
            var hs = h
            let m2 = try hs.handleClientHello(try await io.receive("ClientHello"))
            try await io.send(m2)
            let (m4, keys) = try hs.handleClientAuth(try await io.receive("ClientAuth"))
            try await io.send(m4)
            return keys
        }
        return try SecureChannel(transport: transport, keys: keys, options: options)
    }

    /// Handshake I/O with the error mapping every step shares.
    struct HandshakeIO: Sendable {
        let transport: FrameTransport
        let peerRole: String
        func send(_ f: [UInt8]) async throws { try await transport.send(f) }
        func receive(_ stage: String) async throws -> [UInt8] {
            let frame: [UInt8]?
            do { frame = try await transport.receive() }
            catch let e as TransportError {
                if case .frameTooLarge = e {
                    throw HandshakeError(failure: .malformed, rejectedByPeer: false, peer: transport.peerDescription,
                                         detail: "\(peerRole) sent an oversized frame during the handshake (waiting for \(stage)): \(e)",
                                         reply: Reject.frame(.malformed, "handshake frame too large"))
                }
                throw HandshakeError(failure: .peerClosed, rejectedByPeer: false, peer: transport.peerDescription,
                                     detail: "the connection failed while waiting for \(stage): \(e)")
            }
            guard let frame else {
                throw HandshakeError(failure: .peerClosed, rejectedByPeer: false, peer: transport.peerDescription,
                                     detail: "\(peerRole) closed the connection while we waited for \(stage)")
            }
            return frame
        }
    }

    private static func runHandshake(_ transport: FrameTransport, options: SecureChannelOptions, peerRole: String,
                                     _ body: @escaping @Sendable (HandshakeIO) async throws -> SessionKeys) async throws -> SessionKeys {
        let io = HandshakeIO(transport: transport, peerRole: peerRole)
        let timeout = options.handshakeTimeout
        do {
            return try await withThrowingTaskGroup(of: SessionKeys?.self) { group in
                group.addTask { try await body(io) }
                group.addTask { try await Task.sleep(for: timeout); return nil }
                defer { group.cancelAll() }
                if let first = try await group.next(), let keys = first { return keys }
                // The timer won: tell the peer (best effort, it may not read) and close.
                throw HandshakeError(failure: .timeout, rejectedByPeer: false, peer: transport.peerDescription,
                                     detail: "\(peerRole) did not complete the handshake within \(timeout); connection closed",
                                     reply: Reject.frame(.timeout, "handshake timeout"))
            }
        } catch let e as HandshakeError {
            if let reply = e.reply {
                // Best effort, bounded: the peer may have stopped reading. A
                // small frame is written at once when the send gets to run,
                // which on a loaded host can take longer than a millisecond;
                // give it a quarter of a second so the peer learns why.
                let sending = Task { try? await transport.send(reply) }
                let bound = Task {
                    try? await Task.sleep(for: .milliseconds(250))
                    sending.cancel()
                }
                _ = await sending.value
                bound.cancel()
            }
            transport.close()
            throw e
        } catch {
            transport.close()
            throw error
        }
    }
}
