// Two "hosts" for the whole-process migration tests (issue 13): the source
// and the destination each in a network namespace of its own, joined by one
// veth pair (10.232.N.1 and .2), and the migrated program in a pid namespace
// of its own (unshare --pid --fork; no mount namespace, so CRIU dumps no
// mounts), so the restored process gets its pid back on the same machine.
// Commands enter a namespace with nsenter --net, which, unlike `ip netns
// exec`, leaves the mount namespace alone.
import Foundation
import Testing
import FerryCRIU
import FerryTestSupport
@testable import FerryMigration

enum CriuSupport {
    /// The package's root, from this file's path.
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path
    }()

    /// The criu the tests use: $FERRY_CRIU, criu on PATH, or the one
    /// Tools/setup-criu.sh put under .build/criu.
    static let criu: Criu? = {
        guard let found = (try? Criu.locate()) ?? (try? Criu.check(path: root + "/.build/criu/criu")) else { return nil }
        // The seeders and leechers the tests start find it the same way.
        setenv("FERRY_CRIU", found.path, 1)
        return found
    }()

    static let tools = ["/usr/bin/nsenter", "/usr/bin/unshare", "/usr/bin/gcc", "/usr/bin/setsid"]

    static var available: Bool {
        criu != nil && Netns.available && tools.allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static let reason = "needs root, ip netns, nsenter, unshare, gcc and CRIU 4.1+ (Tools/setup-criu.sh; FERRY_CRIU)"
}

/// A source and a destination namespace, a scratch directory and a secret.
final class CriuHosts {
    let source: String
    let destination: String
    let sourceAddress: String
    let destinationAddress: String
    let scratch: String
    let secret: String
    private let link: String

    init() throws {
        // Unique per instance: suites may run at once.
        let tag = Int.random(in: 0..<100_000)
        source = "ferry-cs-\(tag)"
        destination = "ferry-cd-\(tag)"
        let octet = tag % 250 + 1
        sourceAddress = "10.232.\(octet).1"
        destinationAddress = "10.232.\(octet).2"
        link = "fcs\(tag)"
        scratch = "/tmp/ferry-criu-test-\(getpid())-\(tag)"
        Self.remove([source, destination], link)
        try? FileManager.default.removeItem(atPath: scratch)
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        secret = scratch + "/secret"
        FileManager.default.createFile(atPath: secret, contents: Data((try PreSharedSecret.generate().text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
        for step in [["netns", "add", source], ["netns", "add", destination],
                     ["link", "add", link, "type", "veth", "peer", "name", link + "p"],
                     ["link", "set", link, "netns", source], ["link", "set", link + "p", "netns", destination],
                     ["-n", source, "addr", "add", sourceAddress + "/24", "dev", link],
                     ["-n", destination, "addr", "add", destinationAddress + "/24", "dev", link + "p"],
                     ["-n", source, "link", "set", link, "up"], ["-n", destination, "link", "set", link + "p", "up"],
                     ["-n", source, "link", "set", "lo", "up"], ["-n", destination, "link", "set", "lo", "up"]] {
            let (status, output) = runIP(step)
            guard status == 0 else {
                Self.remove([source, destination], link)
                throw TestFailure("ip \(step.joined(separator: " ")) failed: \(output)")
            }
        }
    }

    deinit {
        // A leecher killed after the images arrived leaves its `criu
        // lazy-pages` waiting: end every process that names our scratch directory.
        for pid in Self.processes(naming: scratch) { kill(pid, SIGKILL) }
        Self.remove([source, destination], link)
        // FERRY_TEST_KEEP=1 keeps the images and CRIU's logs for a post-mortem.
        if ProcessInfo.processInfo.environment["FERRY_TEST_KEEP"] != "1" {
            try? FileManager.default.removeItem(atPath: scratch)
        }
    }

    /// Processes whose command line contains `text`.
    static func processes(naming text: String) -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: data.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(text)
        }
    }

    private static func remove(_ namespaces: [String], _ link: String) {
        for namespace in namespaces { runIP(["netns", "del", namespace]) }
        runIP(["link", "del", link])
    }

    /// `command` run in namespace `ns` (network only).
    func inNamespace(_ ns: String, _ command: [String]) throws -> ChildProcess {
        try ChildProcess("/usr/bin/nsenter", ["--net=/run/netns/\(ns)"] + command)
    }

    /// The workload (Tools/criu-workload), built once per run.
    static let workload: String = {
        let out = "/tmp/ferry-criu-workload-\(getpid())"
        let gcc = Process()
        gcc.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
        gcc.arguments = ["-O2", "-pthread", "-o", out, CriuSupport.root + "/Tools/criu-workload/workload.c"]
        try? gcc.run()
        gcc.waitUntilExit()
        return out
    }()

    /// Starts a program on the source host as init of a new pid namespace;
    /// returns the `unshare` parent and the program's pid here.
    func startInPidNamespace(_ command: [String]) throws -> (ChildProcess, Int32) {
        let parent = try inNamespace(source, ["/usr/bin/unshare", "--pid", "--fork"] + command)
        let deadline = ChildProcess.now() + 10
        while ChildProcess.now() < deadline {
            if let text = try? String(contentsOfFile: "/proc/\(parent.pid)/task/\(parent.pid)/children", encoding: .utf8),
               let pid = text.split(separator: " ").first.flatMap({ Int32($0) }) {
                return (parent, pid)
            }
            usleep(10_000)
        }
        parent.stop()
        throw TestFailure("the program did not start in its pid namespace")
    }

    /// The workload with MIB of memory under RATE writes a second, with
    /// `environment` (NAME=value) added to its own; returns its log path too.
    func startWorkload(mib: Int, rate: Int, environment: [String] = []) throws -> (ChildProcess, Int32, String) {
        let log = scratch + "/workload.log"
        let (parent, pid) = try startInPidNamespace(["/usr/bin/env"] + environment + [Self.workload, "\(mib)", "\(rate)", log])
        let deadline = ChildProcess.now() + 30
        while ChildProcess.now() < deadline {
            if (try? String(contentsOfFile: log, encoding: .utf8))?.contains("ready") == true { return (parent, pid, log) }
            usleep(20_000)
        }
        throw TestFailure("the workload did not say ready")
    }

    func seeder(pid: Int32, _ extra: [String] = []) throws -> ChildProcess {
        let seeder = try inNamespace(source, [builtExecutable("seeder"), "serve", "\(pid)", "--with-criu",
                                              "--listen", sourceAddress + ":7070", "--secret-file", secret,
                                              "--criu-dir", scratch + "/dump", "--json"] + extra)
        _ = try seeder.expect("{\"event\":\"listening\"")
        return seeder
    }

    func leecher(_ extra: [String] = []) throws -> ChildProcess {
        try inNamespace(destination, [builtExecutable("leecher"), "pull", sourceAddress + ":7070", "--restore",
                                      "--images", scratch + "/restore", "--secret-file", secret, "--json"] + extra)
    }

    /// A criu that fails at `step` and otherwise is the real one.
    func failingCriu(at step: String, sleeping: Bool = false) throws -> String {
        let path = scratch + "/criu-\(step)-\(sleeping ? "slow" : "fails")"
        let action = sleeping ? "sleep 60" : "echo 'injected failure' >&2; exit 1"
        let text = "#!/bin/sh\nif [ \"$1\" = \(step) ]; then \(action); fi\nexec \(CriuSupport.criu!.path) \"$@\"\n"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    /// Asks the workload to check itself (SIGUSR1) and returns the check line.
    static func check(pid: Int32, log: String) throws -> String {
        let before = (try? String(contentsOfFile: log, encoding: .utf8))?.components(separatedBy: "check ").count ?? 0
        kill(pid, SIGUSR1)
        let deadline = ChildProcess.now() + 30
        while ChildProcess.now() < deadline {
            let parts = (try? String(contentsOfFile: log, encoding: .utf8))?.components(separatedBy: "check ") ?? []
            if parts.count > before, let line = parts.last?.split(separator: "\n").first { return "check " + line }
            usleep(20_000)
        }
        throw TestFailure("pid \(pid) did not check itself")
    }

    /// A JSON event's integer field.
    static func field(_ name: String, in line: String) -> Int64? {
        guard let range = line.range(of: "\"\(name)\":-?[0-9]+", options: .regularExpression) else { return nil }
        return Int64(line[range].split(separator: ":").last!)
    }

    /// A `key=N` value of a workload check line.
    static func value(_ key: String, in line: String) -> Int64? {
        line.split(separator: " ").first { $0.hasPrefix(key + "=") }.flatMap { Int64($0.dropFirst(key.count + 1)) }
    }

    static func isRunning(_ pid: Int32) -> Bool {
        guard let state = procState("/proc/\(pid)/stat") else { return false }
        return state != "Z" && state != "T" && state != "t"
    }
}
