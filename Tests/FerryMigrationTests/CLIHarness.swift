// Real `seeder` and `leecher` processes for the tests that drive the
// commands: one secret file, the seeder on an ephemeral port, and the checks
// on the source that every failure test makes.
import Foundation
import FerryTestSupport
@testable import FerryMigration

final class CLIHarness {
    /// One secret file per harness, removed with it.
    let secretPath = "/tmp/ferry-cli-secret-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"

    init() throws {
        let secret = try PreSharedSecret.generate()
        FileManager.default.createFile(atPath: secretPath, contents: Data((secret.text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
    }

    deinit { try? FileManager.default.removeItem(atPath: secretPath) }

    /// Starts `seeder serve` and returns it with the address it listens on.
    func startSeeder(pid: Int32, _ extra: [String] = []) throws -> (ChildProcess, String) {
        let seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", secretPath,
                                       "--json"] + extra)
        let line = try seeder.expect("{\"event\":\"listening\"")
        guard let range = line.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression) else {
            throw TestFailure("no address in \(line)")
        }
        return (seeder, String(line[range]))
    }

    func startLeecher(_ address: String, out: String, _ extra: [String] = []) throws -> ChildProcess {
        try ChildProcess(builtExecutable("leecher"),
                         ["pull", address, "--secret-file", secretPath, "--out", out, "--json"] + extra)
    }

    /// True when the workload does not answer within half a second: frozen.
    func isFrozen(_ child: Memwriter) -> Bool {
        child.send("count")
        return (try? child.expect("count", timeout: 0.5)) == nil
    }

    /// True when the workload's write counter moves: the process runs.
    func isRunning(_ child: Memwriter) throws -> Bool {
        child.send("count")
        let before = try child.expect("count")
        usleep(200_000)
        child.send("count")
        return try child.expect("count") != before
    }
}
