// The commands as people and scripts run them: real `seeder` and `leecher`
// processes, killed at the worst moments. A failed migration loses nothing:
// the source runs on, and no image that looks complete is left behind.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) final class CommandLineTests {
    /// One secret file per test (the suite is serialized), removed with it.
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
                                       "--json", "--grace", "1"] + extra)
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

    /// `seeder serve PID` and `leecher pull --out` as processes: both exit 0,
    /// and `leecher verify --pid` finds the image equal to the stopped source.
    func migrateAndVerify(pid: Int32, name: String) throws {
        let (seeder, address) = try startSeeder(pid: pid)
        defer { seeder.stop() }
        let out = scratchDirectory(name)
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = try startLeecher(address, out: out)
        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 60)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        let verify = try ChildProcess(builtExecutable("leecher"), ["verify", out, "--pid", "\(pid)", "--json"])
        #expect(try verify.expect("{\"event\":\"verified\"").contains("\"pid\":\(pid)"))
        #expect(verify.waitForExit() == 0)
    }

    @Test func aCompleteMigrationExitsZeroAndTheImageVerifies() throws {
        let child = try Memwriter(["--mib", "16", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        try migrateAndVerify(pid: child.pid, name: "cli-ok")
    }

    @Test func aSeederOnStandardInputAndOutputThroughExec() throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { child.stop() }
        let out = scratchDirectory("cli-exec")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let seederCommand = "\(builtExecutable("seeder")) serve --stdio \(child.pid) --secret-file \(secretPath)"
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", "exec:" + seederCommand, "--secret-file", secretPath, "--out", out, "--json"])
        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 60)
        #expect(leecher.waitForExit() == 0)
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
    }

    @Test func pullingIntoAnotherProcessPlacesTheMemoryThere() throws {
        let source = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { source.stop() }
        let destination = try Memwriter(["--mib", "1", "--no-write"])  // stands for a restored program
        defer { destination.stop() }
        func migratableBytes(_ pid: Int32) throws -> UInt64 {
            try ProcessMaps.read(pid: pid).filter { $0.kind == .migrate }.reduce(0) { $0 + $1.range.length }
        }
        let before = try migratableBytes(destination.pid)
        let sliceBefore = try String(contentsOfFile: "/proc/\(destination.pid)/sched", encoding: .utf8)
            .split(separator: "\n").first { $0.hasPrefix("se.slice") }
        let (seeder, address) = try startSeeder(pid: source.pid)
        defer { seeder.stop() }
        // --slice-us: a short scheduler slice while post-copy runs, the default back afterwards.
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", address, "--secret-file", secretPath, "--into", "\(destination.pid)",
                                        "--slice-us", "100", "--json"])
        let placed = try leecher.expect("{\"event\":\"placed\"", timeout: 60)
        #expect(placed.contains("\"pid\":\(destination.pid)"))
        #expect(leecher.waitForExit() == 0)
        // The source's memory now lives in the destination too (the leecher
        // checked every byte against the frozen source before saying "placed").
        let main = try #require(source.regions["main"])
        #expect(try migratableBytes(destination.pid) >= before + main.length)
        #expect(!isFrozen(destination))
        let sliceAfter = try String(contentsOfFile: "/proc/\(destination.pid)/sched", encoding: .utf8)
            .split(separator: "\n").first { $0.hasPrefix("se.slice") }
        #expect(sliceAfter == sliceBefore, "the destination's scheduler slice is restored")
    }

    @Test func killingTheLeecherBeforeTheFreezeCostsNothing() throws {
        // Large enough that the first pass outlasts the first progress event
        // (a page counts clean once received, so even 100 % is reached).
        let child = try Memwriter(["--mib", "256", "--threads", "2", "--rate", "20000"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid)
        defer { seeder.stop() }
        let out = scratchDirectory("cli-kill-early")
        let leecher = try startLeecher(address, out: out, ["--finalize-at", "100%", "--max-wait", "60"])
        _ = try leecher.expect("{\"event\":\"progress\"")
        leecher.stop()
        _ = try seeder.expect("{\"event\":\"error\"", timeout: 10)
        #expect(seeder.waitForExit() == 1)
        #expect(try isRunning(child))
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test func killingTheLeecherAfterTheFreezeThawsTheSourceAfterTheGrace() throws {
        let child = try Memwriter(["--mib", "128", "--threads", "2", "--rate", "20000"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid)
        defer { seeder.stop() }
        let out = scratchDirectory("cli-kill-late")
        let leecher = try startLeecher(address, out: out, ["--finalize-at", "0%"])
        _ = try leecher.expect("{\"event\":\"finalized\"", timeout: 30)
        leecher.stop()
        #expect(isFrozen(child), "the source must stay frozen until the grace period ends")
        let error = try seeder.expect("{\"event\":\"error\"", timeout: 10)
        #expect(error.contains("thawed and runs on"))
        #expect(seeder.waitForExit() == 1)
        #expect(try isRunning(child))
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test func killingTheSeederFailsTheLeecherClearlyAndLeavesNoImage() throws {
        // Large enough to be killed in the first pass, as above.
        let child = try Memwriter(["--mib", "256", "--threads", "2", "--rate", "20000"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid)
        let out = scratchDirectory("cli-kill-seeder")
        let leecher = try startLeecher(address, out: out, ["--finalize-at", "100%", "--max-wait", "60"])
        _ = try leecher.expect("{\"event\":\"progress\"")
        seeder.stop()
        let error = try leecher.expect("{\"event\":\"error\"", timeout: 30)
        #expect(error.contains("lost the connection to the seeder"))
        #expect(leecher.waitForExit() == 1)
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try isRunning(child))
    }

    @Test func badInputGetsClearErrors() throws {
        let noSuchPid = try ChildProcess(builtExecutable("seeder"),
                                         ["serve", "999999", "--secret-file", secretPath, "--json"])
        let line = try noSuchPid.expect("{\"event\":\"error\"")
        #expect(line.contains("999999"))
        #expect(noSuchPid.waitForExit() == 1)

        let nobody = try ChildProcess(builtExecutable("leecher"),
                                      ["pull", "127.0.0.1:1", "--secret-file", secretPath, "--json",
                                       "--out", scratchDirectory("cli-nobody")])
        #expect(try nobody.expect("{\"event\":\"error\"").contains("cannot connect to 127.0.0.1:1"))
        #expect(nobody.waitForExit() == 1)

        let badHeuristic = try ChildProcess(builtExecutable("leecher"),
                                            ["pull", "127.0.0.1:1", "--secret-file", secretPath, "--heuristic", "fastest"])
        #expect(badHeuristic.waitForExit() != 0)

        // Flags that only make sense together, or out of range: refused before connecting.
        for (flags, message) in [("--slice-us 100", "Error: --slice-us applies to post-copy into a process: use it with --into PID"),
                                 ("--into 1 --slice-us 5", "Error: --slice-us takes 50 to 100000 microseconds"),
                                 ("--max-freeze-age=-1", "Error: --max-freeze-age must be 0 or more seconds"),
                                 ("--max-downtime=-5", "Error: --max-downtime takes 0 or more milliseconds"),
                                 ("--max-precopy lots", "Error: --max-precopy: cannot read 'lots' as a multiple of the memory size: write it like 1.5x, or inf for no bound")] {
            let refused = try ChildProcess("/bin/sh", ["-c", "exec '\(builtExecutable("leecher"))' pull 127.0.0.1:1 \(flags) 2>&1"])
            #expect(try refused.expect("Error:") == message)
            #expect(refused.waitForExit() != 0)
        }
    }

    @Test func aWrongSecretIsRefusedOnBothSides() throws {
        let child = try Memwriter(["--mib", "4"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid)
        defer { seeder.stop() }
        let otherSecret = "/tmp/ferry-cli-other-\(getpid())"
        FileManager.default.createFile(atPath: otherSecret,
                                       contents: Data((try PreSharedSecret.generate().text + "\n").utf8),
                                       attributes: [.posixPermissions: 0o600])
        defer { try? FileManager.default.removeItem(atPath: otherSecret) }
        let leecher = try ChildProcess(builtExecutable("leecher"),
                                       ["pull", address, "--secret-file", otherSecret, "--json",
                                        "--out", scratchDirectory("cli-wrong-secret")])
        let error = try leecher.expect("{\"event\":\"error\"")
        #expect(error.contains("secret"))
        #expect(leecher.waitForExit() == 1)
        let refused = try seeder.expect("{\"event\":\"refused\"")
        #expect(refused.contains("secret"))
    }

    /// Issue 11 finding 10: `--into PID` was checked only when post-copy
    /// began, after the source had been frozen. A target we cannot attach to
    /// is refused before connecting: the seeder sees nothing.
    @Test func aBadIntoTargetIsRefusedBeforeConnecting() throws {
        let source = try Memwriter(["--mib", "4", "--threads", "2", "--rate", "2000"])
        defer { source.stop() }
        let (seeder, address) = try startSeeder(pid: source.pid)
        defer { seeder.stop() }
        let threads = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(source.pid)/task").compactMap { Int32($0) }
        let thread = try #require(threads.first { $0 != source.pid })
        for (target, message) in [("999999", "cannot attach to pid 999999: no such process"),
                                  ("\(thread)", "cannot attach to pid \(thread): it is a thread of process \(source.pid)"),
                                  ("0", "cannot attach to pid 0: not a valid process id")] {
            let leecher = try ChildProcess(builtExecutable("leecher"),
                                           ["pull", address, "--secret-file", secretPath, "--into", target, "--json"])
            let error = try leecher.expect("{\"event\":\"error\"", timeout: 10)
            #expect(error.contains(message), "\(error)")
            #expect(leecher.waitForExit() == 1)
        }
        #expect((try? seeder.readLine(timeout: 1)) == nil, "the leecher never connected")
        #expect(try isRunning(source))
    }

    /// Each thread's blocked-signal mask (SigBlk of /proc/PID/task/TID/status).
    func blockedMasks(_ pid: Int32) throws -> [Int32: String] {
        var masks: [Int32: String] = [:]
        for tid in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").compactMap({ Int32($0) }) {
            let status = try String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8)
            masks[tid] = status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") }.map(String.init)
        }
        return masks
    }

    /// The pid tracing `pid`, 0 when none (or nil once it is gone).
    func tracer(of pid: Int32) -> Int32? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        return status.split(separator: "\n").first { $0.hasPrefix("TracerPid:") }
            .flatMap { Int32($0.dropFirst(10).trimmingCharacters(in: .whitespaces)) }
    }

    /// Issue 11 finding 5: a seeder killed by Ctrl-C (or TERM, or HUP) while
    /// it ran a system call inside the target left one of the target's
    /// threads at a borrowed `syscall` instruction with changed registers and
    /// every signal blocked. The signals are sent the moment the seeder
    /// traces the target, when the attach's remote calls run.
    @Test func signalsDuringAttachLeaveTheTargetIntact() throws {
        let child = try Memwriter(["--mib", "4", "--threads", "2", "--rate", "2000"])
        defer { child.stop() }
        #expect(try isRunning(child))
        let masks = try blockedMasks(child.pid)
        for signal in Array(repeating: [SIGINT, SIGTERM, SIGHUP], count: 5).joined() {
            let seeder = try ChildProcess(builtExecutable("seeder"),
                                          ["serve", "\(child.pid)", "--listen", "127.0.0.1:0", "--secret-file", secretPath, "--json"])
            defer { seeder.stop() }
            let deadline = ChildProcess.now() + 10
            while tracer(of: child.pid) == 0 && ChildProcess.now() < deadline {}
            kill(seeder.pid, signal)
            let code = seeder.waitForExit(timeout: 20)
            #expect(code == 1, "signal \(signal) ends the seeder cleanly (exit 1), not by its default action: \(code.map(String.init) ?? "still running")")
            #expect(tracer(of: child.pid) == 0)
            #expect(try isRunning(child), "the target runs on after signal \(signal)")
            let after = try blockedMasks(child.pid)
            #expect(after == masks, "the target's signal masks are intact after signal \(signal): \(after), before \(masks)")
        }
    }

    /// Issue 11 finding 6: under the sync tracker the process waits on the
    /// seeder for each write to a protected page, so Ctrl-Z on the seeder
    /// hung it. The seeder refuses to stop while sync tracks, and says why.
    @Test func ctrlZOnASyncTrackingSeederDoesNotHangTheProcess() throws {
        let child = try Memwriter(["--mib", "64", "--threads", "2", "--rate", "20000"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid, ["--tracker", "sync"])
        defer { seeder.stop() }
        let out = scratchDirectory("cli-tstp")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = try startLeecher(address, out: out, ["--finalize-at", "100%", "--max-wait", "60"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"connected\"", timeout: 60)     // after Track: every page is write-protected
        // Hold the leecher still, so the migration stays in pre-copy (a
        // completed one leaves the process stopped by --then stop).
        kill(leecher.pid, SIGSTOP)
        kill(seeder.pid, SIGTSTP)
        usleep(300_000)
        #expect(seeder.state != "T", "the seeder did not stop")
        #expect((try? isRunning(child)) == true, "the process keeps writing")
        let notice = try seeder.expect("{\"event\":\"notice\"", timeout: 10)
        #expect(notice.contains("not stopping: with the sync tracker"), "\(notice)")
    }

    /// Under the async tracker nothing waits on the seeder: Ctrl-Z stops it
    /// as usual, and SIGCONT continues it.
    @Test func ctrlZStillStopsASeederUnderTheAsyncTracker() throws {
        let child = try Memwriter(["--mib", "4", "--threads", "1", "--rate", "2000"])
        defer { child.stop() }
        let (seeder, _) = try startSeeder(pid: child.pid, ["--tracker", "async"])
        defer { seeder.stop() }
        kill(seeder.pid, SIGTSTP)
        var state = seeder.state
        for _ in 0..<100 where state != "T" { usleep(20_000); state = seeder.state }
        #expect(state == "T", "Ctrl-Z stops the seeder")
        #expect(try isRunning(child))
        kill(seeder.pid, SIGCONT)
        for _ in 0..<100 where state == "T" { usleep(20_000); state = seeder.state }
        #expect(state != "T", "SIGCONT continues it")
        kill(seeder.pid, SIGTERM)
        #expect(seeder.waitForExit() == 1)
    }

    /// Issue 11 finding 11: peers that connect and never finish the
    /// handshake hold at most `maxPendingHandshakes` slots of the seeder;
    /// the next leecher is told the seeder is busy instead of queueing.
    @Test func aSeederCapsUnauthenticatedConnections() throws {
        let child = try Memwriter(["--mib", "4"])
        defer { child.stop() }
        let (seeder, address) = try startSeeder(pid: child.pid)
        defer { seeder.stop() }
        let port = UInt16(address.split(separator: ":").last!)!
        var idle: [Int32] = []
        defer { idle.forEach { close($0) } }
        for _ in 0..<WireLimits.maxPendingHandshakes {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_addr.s_addr = inet_addr("127.0.0.1")
            sa.sin_port = port.bigEndian
            let rc = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(rc == 0, "cannot connect to the seeder: errno \(errno)")
            idle.append(fd)
        }
        let leecher = try startLeecher(address, out: scratchDirectory("cli-busy"))
        let error = try leecher.expect("{\"event\":\"error\"", timeout: 8)
        #expect(error.contains("busy"), "\(error)")
        #expect(leecher.waitForExit() == 1)
        #expect(try seeder.expect("{\"event\":\"refused\"").contains("connections are already in their handshake"))
        #expect(try isRunning(child), "the source was never touched")
    }

    /// Issue 11 finding 8: `keygen -o FILE` followed a link planted at
    /// FILE.pub, truncating its target and setting its mode to 644.
    @Test func keygenRefusesALinkPlantedAtThePublicKeyFile() throws {
        let dir = scratchDirectory("cli-keygen")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let victim = dir + "/victim"
        FileManager.default.createFile(atPath: victim, contents: Data("precious\n".utf8),
                                       attributes: [.posixPermissions: 0o600])
        #expect(symlink(victim, dir + "/id.pub") == 0)
        let keygen = try ChildProcess("/bin/sh", ["-c", "exec '\(builtExecutable("seeder"))' keygen -o \(dir)/id 2>&1"])
        #expect(try keygen.expect("Error:").contains("\(dir)/id.pub: already exists; pass --force to replace it"))
        #expect(keygen.waitForExit() != 0)
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious\n")
        #expect(try FileManager.default.attributesOfItem(atPath: victim)[.posixPermissions] as? Int == 0o600)
        #expect(!FileManager.default.fileExists(atPath: dir + "/id"))

        let forced = try ChildProcess(builtExecutable("seeder"), ["keygen", "-o", dir + "/id", "--force"])
        #expect(try forced.readLine().hasPrefix("ferry-ed25519 "))
        #expect(forced.waitForExit() == 0)
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious\n")
        #expect(try FileManager.default.attributesOfItem(atPath: victim)[.posixPermissions] as? Int == 0o600)
        #expect(try FileManager.default.attributesOfItem(atPath: dir + "/id.pub")[.type] as? FileAttributeType == .typeRegular,
                "--force replaces the link itself")
    }

    /// Issue 15 class 4: a process whose main thread has exited. `seeder
    /// serve <tgid>` migrates it, `leecher verify --pid <tgid>` checks it;
    /// naming one of its live threads points to the tgid.
    @Test func aProcessWhoseMainThreadExitedMigratesByItsProcessId() throws {
        let child = try DeadLeader(mib: 8, rate: 5000)
        defer { child.stop() }
        let tid = try #require(child.liveThreads.first)
        let refused = try ChildProcess(builtExecutable("seeder"),
                                       ["serve", "\(tid)", "--listen", "127.0.0.1:0", "--secret-file", secretPath, "--json"])
        let error = try refused.expect("{\"event\":\"error\"")
        #expect(error.contains("it is a thread of process \(child.pid), whose main thread has exited (attach to pid \(child.pid) instead"), "\(error)")
        #expect(refused.waitForExit() != 0)

        try migrateAndVerify(pid: child.pid, name: "cli-deadleader")
    }
}
