// The hub as the only meeting point, on a network where that is literally
// true: the seeder lives in network namespace A, the leechers in C, the hub
// in the root namespace with one veth into each. A and C have no route to
// each other, so the migration can only go through the hub. The namespaces
// and veths are created for the test and deleted after it, and only
// addresses of 10.231.0.0/16 on them are used.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

/// Runs `ip` (iproute2) and returns its status and output.
@discardableResult
func runIP(_ arguments: [String]) -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: Netns.ipPath)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    do { try process.run() } catch { return (-1, "\(error)") }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Two namespaces, each joined to the root namespace by a veth pair.
struct NetnsTopology: ~Copyable {
    let seederNamespace: String
    let leecherNamespace: String
    /// The hub's addresses (root side of each veth) and the peers' (namespace side).
    let hubOnSeederSide: String, seederAddress: String
    let hubOnLeecherSide: String, leecherAddress: String
    private let links: [String]

    init() throws {
        let tag = getpid() % 100_000
        let octet = 10 + Int(tag % 100) * 2
        seederNamespace = "ferry-a-\(tag)"
        leecherNamespace = "ferry-c-\(tag)"
        hubOnSeederSide = "10.231.\(octet).1"
        seederAddress = "10.231.\(octet).2"
        hubOnLeecherSide = "10.231.\(octet + 1).1"
        leecherAddress = "10.231.\(octet + 1).2"
        links = ["fa\(tag)", "fc\(tag)"]
        Self.remove(namespaces: [seederNamespace, leecherNamespace], links: links)
        let plan: [(String, String, String, String)] = [
            (seederNamespace, links[0], hubOnSeederSide, seederAddress),
            (leecherNamespace, links[1], hubOnLeecherSide, leecherAddress),
        ]
        for (namespace, link, root, inside) in plan {
            for step in [["netns", "add", namespace],
                         ["link", "add", link, "type", "veth", "peer", "name", link + "p"],
                         ["link", "set", link + "p", "netns", namespace],
                         ["addr", "add", root + "/24", "dev", link],
                         ["link", "set", link, "up"],
                         ["-n", namespace, "addr", "add", inside + "/24", "dev", link + "p"],
                         ["-n", namespace, "link", "set", link + "p", "up"],
                         ["-n", namespace, "link", "set", "lo", "up"]] {
                let (status, output) = runIP(step)
                guard status == 0 else {
                    Self.remove(namespaces: [seederNamespace, leecherNamespace], links: links)
                    throw TestFailure("ip \(step.joined(separator: " ")) failed: \(output)")
                }
            }
        }
    }

    deinit { Self.remove(namespaces: [seederNamespace, leecherNamespace], links: links) }

    private static func remove(namespaces: [String], links: [String]) {
        // Deleting a namespace deletes the veth ends in it and so their peers;
        // the explicit link delete covers a half-built topology.
        for namespace in namespaces { runIP(["netns", "del", namespace]) }
        for link in links { runIP(["link", "del", link]) }
    }
}

enum Netns {
    static let ipPath = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .first { FileManager.default.isExecutableFile(atPath: $0) } ?? "/usr/sbin/ip"
    static var available: Bool { geteuid() == 0 && runIP(["netns", "list"]).status == 0 }
}

@Suite(.serialized, .enabled(if: Netns.available, "needs root and iproute2's `ip netns` (network namespaces)"))
struct HubNetnsTests {

    let scratch = "/tmp/ferry-hub-netns-\(getpid())"

    static func address(in line: String, prefix: String) throws -> String {
        guard let range = line.range(of: NSRegularExpression.escapedPattern(for: prefix) + #":\d+"#,
                                     options: .regularExpression) else {
            throw TestFailure("no \(prefix) address in \(line)")
        }
        return String(line[range])
    }

    @Test func seederAndLeechersInSeparateNamespacesMeetOnlyThroughTheHub() throws {
        try? FileManager.default.removeItem(atPath: scratch)
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let secret = scratch + "/secret"
        FileManager.default.createFile(atPath: secret, contents: Data((try PreSharedSecret.generate().text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
        let net = try NetnsTopology()

        // No direct path: each side sees only its own veth.
        let fromLeechers = runIP(["netns", "exec", net.leecherNamespace, Netns.ipPath, "route", "get", net.seederAddress])
        #expect(fromLeechers.status != 0 && fromLeechers.output.contains("unreachable"), "\(fromLeechers.output)")
        let fromSeeder = runIP(["netns", "exec", net.seederNamespace, Netns.ipPath, "route", "get", net.leecherAddress])
        #expect(fromSeeder.status != 0, "\(fromSeeder.output)")

        let child = try Memwriter(["--mib", "16", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        let hub = try ChildProcess(builtExecutable("hub"),
                                   ["serve", "--listen", net.hubOnLeecherSide + ":0",
                                    "--seeders-listen", net.hubOnSeederSide + ":0",
                                    "--secret-file", secret, "--json"])
        defer { hub.stop() }
        let seedersAddress = try Self.address(in: try hub.expect("{\"event\":\"listening\""), prefix: net.hubOnSeederSide)
        let leechersAddress = try Self.address(in: try hub.expect("{\"event\":\"listening\""), prefix: net.hubOnLeecherSide)
        let seeder = try ChildProcess(Netns.ipPath,
                                      ["netns", "exec", net.seederNamespace, builtExecutable("seeder"),
                                       "serve", "\(child.pid)", "--via", seedersAddress, "--name", "db",
                                       "--secret-file", secret, "--grace", "2", "--json"])
        defer { seeder.stop() }
        #expect(try hub.expect("{\"event\":\"upstream\"").contains("\"migration\":\"db\""))
        let outs = [scratch + "/a", scratch + "/b"]
        let leechers = try outs.map { out in
            try ChildProcess(Netns.ipPath,
                             ["netns", "exec", net.leecherNamespace, builtExecutable("leecher"),
                              "pull", leechersAddress, "--migration", "db", "--secret-file", secret,
                              "--out", out, "--json"])
        }
        for leecher in leechers {
            #expect(try leecher.expect("{\"event\":\"connected\"").contains("\"peer\":\"\(leechersAddress)\""))
            _ = try leecher.expect("{\"event\":\"complete\"", timeout: 60)
            #expect(leecher.waitForExit() == 0)
        }
        // The hub saw the leechers arrive from their namespace's address.
        #expect(try hub.expect("{\"event\":\"leecher_joined\"").contains(net.leecherAddress))
        #expect(seeder.waitForExit() == 0)
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }
}
