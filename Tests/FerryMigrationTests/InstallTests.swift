// Tools/install.sh as an administrator runs it, into a temporary prefix,
// with the binaries this test run built (`--from`): every man page renders
// with `man -l`, the bash completion completes `leecher pull --fi`, the unit
// passes `systemd-analyze verify`, and the unit's own command line, with its
// configuration file and credentials laid out as systemd lays them out,
// starts the hub as an unprivileged user. Tools/test.sh installs man-db,
// groff and systemd first; a test whose tool is missing says so and is skipped.
import Foundation
import Testing
import FerryTestSupport

@Suite struct InstallTests {
    /// The repository: three levels above this file.
    static let sourceRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    static let script = sourceRoot + "/Tools/install.sh"
    /// Where `swift build` put the commands and ferry-manual.
    static let binDirectory = (builtExecutable("hub") as NSString).deletingLastPathComponent
    static let tools = ["seeder", "leecher", "hub"]

    /// One installation shared by the tests, removed when the process exits.
    static let prefix = "/tmp/ferry-install-test-\(getpid())"
    static let installation = Task<String, any Error> {
        atexit { try? FileManager.default.removeItem(atPath: InstallTests.prefix) }
        let result = try await run(script, ["--from", binDirectory, prefix])
        guard result.status == 0 else {
            throw TestFailure("install.sh --from \(binDirectory) \(prefix) exited \(result.status): \(result.error)")
        }
        return prefix
    }

    /// The same with `--hub-auth keys`, for the unit's key mode.
    static let keysPrefix = "/tmp/ferry-install-test-keys-\(getpid())"
    static let keysInstallation = Task<String, any Error> {
        atexit { try? FileManager.default.removeItem(atPath: InstallTests.keysPrefix) }
        let result = try await run(script, ["--from", binDirectory, "--hub-auth", "keys", keysPrefix])
        guard result.status == 0 else {
            throw TestFailure("install.sh --hub-auth keys \(keysPrefix) exited \(result.status): \(result.error)")
        }
        return keysPrefix
    }

    static func has(_ command: String) -> Bool {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path.split(separator: ":").contains { access("\($0)/\(command)", X_OK) == 0 }
    }

    @Test func installsCommandsPagesCompletionsAndUnit() async throws {
        let prefix = try await Self.installation.value
        var expected: [(String, Int)] = []
        for tool in Self.tools {
            expected += [("bin/\(tool)", 0o755), ("share/man/man1/\(tool).1", 0o644),
                         ("share/bash-completion/completions/\(tool)", 0o644),
                         ("share/zsh/site-functions/_\(tool)", 0o644),
                         ("share/fish/vendor_completions.d/\(tool).fish", 0o644)]
        }
        expected += [("share/man/man1/leecher-pull.1", 0o644), ("share/man/man1/seeder-serve.1", 0o644),
                     ("share/man/man1/hub-serve.1", 0o644), ("lib/systemd/system/ferry-hub.service", 0o644),
                     ("etc/ferry/hub.env", 0o644), ("etc/ferry/hub", 0o700)]
        for (path, mode) in expected {
            let attributes = try? FileManager.default.attributesOfItem(atPath: prefix + "/" + path)
            #expect(attributes != nil, "install.sh did not install \(path)")
            if let attributes {
                #expect((attributes[.posixPermissions] as? Int) == mode,
                        "\(path) has mode \(String((attributes[.posixPermissions] as? Int) ?? 0, radix: 8)), not \(String(mode, radix: 8))")
            }
        }
        let zsh = try String(contentsOfFile: prefix + "/share/zsh/site-functions/_leecher", encoding: .utf8)
        #expect(zsh.hasPrefix("#compdef leecher"), "the zsh completion does not start with #compdef leecher")
        let fish = try String(contentsOfFile: prefix + "/share/fish/vendor_completions.d/leecher.fish", encoding: .utf8)
        #expect(fish.contains("complete -c 'leecher'") || fish.contains("complete -c leecher"),
                "the fish completion does not complete leecher")
        let unit = try String(contentsOfFile: prefix + "/lib/systemd/system/ferry-hub.service", encoding: .utf8)
        #expect(unit.range(of: "@[A-Z_]+@", options: .regularExpression) == nil, "the unit keeps a template placeholder")
        #expect(unit.contains("ExecStart=\(prefix)/bin/hub serve "))
        #expect(unit.contains("LoadCredential=secret:\(prefix)/etc/ferry/hub/secret"))
        #expect(unit.contains("DynamicUser=yes"))
    }

    @Test(.enabled(if: InstallTests.has("man"), "man-db is not installed (Tools/setup.sh man-db groff-base)"))
    func everyManPageRendersWithoutWarnings() async throws {
        let prefix = try await Self.installation.value
        let directory = prefix + "/share/man/man1"
        let pages = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".1") }.sorted()
        // A page per command and per subcommand: seeder 4, leecher 4, hub 3, and the three commands.
        #expect(pages.count >= 14, "only \(pages)")
        for page in pages {
            let name = String(page.dropLast(2))
            let result = try await Self.run("/usr/bin/env", ["man", "--warnings", "-l", directory + "/" + page],
                                            environment: ["LANG": "C", "LC_ALL": "C", "MANWIDTH": "80", "MANPAGER": "cat"])
            #expect(result.status == 0, "man -l \(page) exited \(result.status): \(result.error)")
            #expect(result.error.isEmpty, "man -l \(page) warned: \(result.error)")
            #expect(result.output.hasPrefix(name.uppercased() + "(1)"), "\(page) renders without its title: \(result.output.prefix(200))")
            for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS"] {
                #expect(result.output.contains("\n" + section + "\n"), "\(page) has no \(section) section")
            }
        }
        let pull = try await Self.run("/usr/bin/env", ["man", "-l", directory + "/leecher-pull.1"],
                                      environment: ["LANG": "C", "LC_ALL": "C", "MANWIDTH": "80"])
        #expect(pull.output.contains("--finalize-at PCT"), "leecher-pull(1) does not describe --finalize-at")
        #expect(pull.output.contains("Default: 95%."), "leecher-pull(1) does not give --finalize-at's default")
        // `man leecher pull` finds the subcommand's page, as `man git commit` does.
        let found = try await Self.run("/usr/bin/env", ["man", "-w", "leecher", "pull"],
                                       environment: ["MANPATH": prefix + "/share/man"])
        #expect(found.output == directory + "/leecher-pull.1\n", "man -w leecher pull found \(found.output.debugDescription) \(found.error)")
    }

    /// Text roff would take for requests or escapes, examples, lists, a
    /// titled option group and a hidden flag, as a command could describe them.
    static let trickyTool = #"""
        {"serializationVersion":0,"command":{"commandName":"tricky","abstract":"A tool with \\ backslashes and \"quotes\".","discussion":".starts with a dot\n'starts with a quote\n\nA paragraph with `code` and a \\fB escape.\n\n  indented example --flag\n  .dot in example\n\n- first item\n- second item\n  continued","subcommands":[{"commandName":"run","superCommands":["tricky"],"abstract":"Run it.","arguments":[{"kind":"option","shouldDisplay":true,"sectionTitle":"Bandwidth","isOptional":true,"isRepeating":false,"parsingStrategy":"default","names":[{"kind":"long","name":"max-rate"}],"preferredName":{"kind":"long","name":"max-rate"},"valueName":"RATE","defaultValue":"inf","abstract":"Cap the rate.","discussion":"Second paragraph.\n\nThird."},{"kind":"flag","shouldDisplay":true,"isOptional":true,"isRepeating":false,"parsingStrategy":"default","names":[{"kind":"long","name":"fast"},{"kind":"short","name":"f"}],"preferredName":{"kind":"long","name":"fast"},"abstract":"Go fast."},{"kind":"option","shouldDisplay":true,"isOptional":false,"isRepeating":true,"parsingStrategy":"default","names":[{"kind":"long","name":"mode"}],"preferredName":{"kind":"long","name":"mode"},"valueName":"mode","allValues":["a","b"],"allValueDescriptions":{"a":"the a mode","b":"the b mode"},"abstract":"Mode."},{"kind":"positional","shouldDisplay":true,"isOptional":true,"isRepeating":true,"parsingStrategy":"default","valueName":"file","abstract":"Files."},{"kind":"flag","shouldDisplay":false,"isOptional":true,"isRepeating":false,"parsingStrategy":"default","names":[{"kind":"long","name":"hidden"}],"abstract":"Hidden."}]}]}}
        """#

    @Test(.enabled(if: InstallTests.has("man"), "man-db is not installed (Tools/setup.sh man-db groff-base)"))
    func manualGeneratorKeepsTextVerbatim() async throws {
        let directory = "/tmp/ferry-manual-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try Self.trickyTool.write(toFile: directory + "/tricky.json", atomically: false, encoding: .utf8)
        let generated = try await Self.run(builtExecutable("ferry-manual"),
                                           ["--output-directory", directory, directory + "/tricky.json"])
        #expect(generated.status == 0, "ferry-manual exited \(generated.status): \(generated.error)")
        #expect(generated.output == "\(directory)/tricky.1\n\(directory)/tricky-run.1\n")
        func render(_ page: String) async throws -> String {
            let result = try await Self.run("/usr/bin/env", ["man", "--warnings", "-l", directory + "/" + page],
                                            environment: ["LANG": "C", "LC_ALL": "C", "MANWIDTH": "80"])
            #expect(result.status == 0 && result.error.isEmpty, "man -l \(page): \(result.error)")
            // Words as the reader sees them, whatever the line breaks.
            return result.output.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        }
        let tool = try await render("tricky.1")
        for text in [#"tricky - A tool with \ backslashes and "quotes"."#, ".starts with a dot 'starts with a quote",
                     #"A paragraph with code and a \fB escape."#, "indented example --flag .dot in example",
                     "o first item o second item continued", "run Run it. See tricky-run(1)."] {
            #expect(tool.contains(text), "tricky(1) lacks \(text.debugDescription): \(tool)")
        }
        let run = try await render("tricky-run.1")
        for text in ["tricky run [--max-rate RATE] [--fast] --mode mode ... [file ...]",
                     "ARGUMENTS file ... Files.", "OPTIONS -f, --fast Go fast. --mode mode ... Mode. a: the a mode b: the b mode",
                     "Bandwidth --max-rate RATE Cap the rate. Second paragraph. Third. Default: inf.", "SEE ALSO tricky(1)"] {
            #expect(run.contains(text), "tricky-run(1) lacks \(text.debugDescription): \(run)")
        }
        #expect(!run.contains("hidden"), "a hidden flag is on the page")
    }

    @Test func bashCompletesFinalizeAt() async throws {
        let prefix = try await Self.installation.value
        // What bash does on TAB after `leecher pull --fi`: the function the
        // script registers with `complete -F`, called with the words so far.
        let probe = """
            source "$1"
            spec=$(complete -p leecher) || exit 3
            function=${spec#*-F }; function=${function%% *}
            COMP_LINE='leecher pull --fi'; COMP_POINT=${#COMP_LINE}
            COMP_WORDS=(leecher pull --fi); COMP_CWORD=2
            "$function" leecher --fi pull
            printf '%s\\n' "${COMPREPLY[@]}"
            """
        let result = try await Self.run("/bin/bash", ["--norc", "--noprofile", "-c", probe, "probe",
                                                      prefix + "/share/bash-completion/completions/leecher"],
                                        environment: ["PATH": prefix + "/bin:/usr/bin:/bin"])
        #expect(result.status == 0, "the completion probe exited \(result.status): \(result.error)")
        #expect(result.output.split(separator: "\n").contains("--finalize-at"),
                "`leecher pull --fi` completes to \(result.output.debugDescription), not --finalize-at")
    }

    @Test(.enabled(if: InstallTests.has("systemd-analyze"), "systemd-analyze is not installed (Tools/setup.sh systemd)"))
    func unitVerifiesInBothAuthModes() async throws {
        let prefix = try await Self.installation.value
        try await verify(unit: prefix + "/lib/systemd/system/ferry-hub.service", manPath: prefix + "/share/man")
        // Key mode, into a prefix of its own.
        let keys = try await Self.keysInstallation.value
        let unit = try String(contentsOfFile: keys + "/lib/systemd/system/ferry-hub.service", encoding: .utf8)
        #expect(unit.contains("LoadCredential=key:\(keys)/etc/ferry/hub/key\nLoadCredential=authorized:\(keys)/etc/ferry/hub/authorized\n"))
        #expect(unit.contains("--key ${CREDENTIALS_DIRECTORY}/key --authorized ${CREDENTIALS_DIRECTORY}/authorized"))
        try await verify(unit: keys + "/lib/systemd/system/ferry-hub.service", manPath: keys + "/share/man")
    }

    /// `systemd-analyze verify` checks the directives, that ExecStart is
    /// executable, and (with MANPATH) that the Documentation= pages exist;
    /// `systemd-analyze security` scores the sandbox.
    func verify(unit: String, manPath: String) async throws {
        let result = try await Self.run("/usr/bin/env", ["systemd-analyze", "verify", "--man=yes", unit],
                                        environment: ["MANPATH": manPath, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""])
        #expect(result.status == 0, "systemd-analyze verify \(unit) exited \(result.status): \(result.error)")
        #expect(result.error.isEmpty && result.output.isEmpty,
                "systemd-analyze verify \(unit) complained: \(result.error)\(result.output)")
        // The hardening: systemd's own exposure score, 0 (locked down) to 10,
        // must stay in its "OK" band (1.4 when this test was written).
        let security = try await Self.run("/usr/bin/env", ["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                                                           "--no-pager", unit])
        #expect(security.status == 0, "the unit's exposure rose above 2.0: \(security.output.split(separator: "\n").last ?? "")")
    }

    @Test(.enabled(if: getuid() == 0 && InstallTests.has("setpriv"), "needs root and setpriv (util-linux) to run the hub as another user"),
          arguments: ["secret", "keys"])
    func unitCommandStartsTheHubAsAnUnprivilegedUser(auth: String) async throws {
        let prefix = try await (auth == "keys" ? Self.keysInstallation : Self.installation).value
        let unit = try String(contentsOfFile: prefix + "/lib/systemd/system/ferry-hub.service", encoding: .utf8)
        var environment = try Self.environmentFile(prefix + "/etc/ferry/hub.env")
        #expect(environment["FERRY_HUB_LISTEN"]?.isEmpty == false, "hub.env sets no FERRY_HUB_LISTEN")
        // The configured addresses, on ports the kernel picks (tests run side by side).
        for (name, value) in environment {
            environment[name] = value.replacingOccurrences(of: #":\d+\b"#, with: ":0", options: .regularExpression)
        }
        // The credentials as systemd passes them: a directory only the
        // service's user can enter, files it owns, mode 0400, named as the
        // unit's LoadCredential= lines name them.
        let nobody: uid_t = 65534
        let credentials = "/tmp/ferry-install-credentials-\(auth)-\(getpid())"
        try? FileManager.default.removeItem(atPath: credentials)
        defer { try? FileManager.default.removeItem(atPath: credentials) }
        try FileManager.default.createDirectory(atPath: credentials, withIntermediateDirectories: false)
        let names = unit.split(separator: "\n").filter { $0.hasPrefix("LoadCredential=") }
            .map { String($0.dropFirst("LoadCredential=".count).prefix { $0 != ":" }) }
        if auth == "keys" {
            #expect(names == ["key", "authorized"])
            let keygen = try await Self.run(prefix + "/bin/hub", ["keygen", "-o", credentials + "/key"])
            #expect(keygen.status == 0, "hub keygen: \(keygen.error)")
            try FileManager.default.moveItem(atPath: credentials + "/key.pub", toPath: credentials + "/authorized")
        } else {
            #expect(names == ["secret"])
            let secret = try await Self.run(prefix + "/bin/hub", ["secret"])
            #expect(FileManager.default.createFile(atPath: credentials + "/secret", contents: Data(secret.output.utf8)))
        }
        for name in names {
            #expect(chown(credentials + "/" + name, nobody, gid_t(nobody)) == 0 && chmod(credentials + "/" + name, 0o400) == 0)
        }
        #expect(chown(credentials, nobody, gid_t(nobody)) == 0 && chmod(credentials, 0o500) == 0)
        environment["CREDENTIALS_DIRECTORY"] = credentials

        let command = try Self.execStart(unit, environment: environment)
        #expect(command.first == prefix + "/bin/hub", "ExecStart runs \(command.first ?? "nothing")")
        let hub = try ChildProcess("/usr/bin/setpriv",
                                   ["--reuid=\(nobody)", "--regid=\(nobody)", "--clear-groups", "--no-new-privs"]
                                   + command + ["--json"])
        defer { hub.stop() }
        // Both sides listening: the leechers' (--listen) and, by hub.env's
        // default, the seeders' (--seeders-listen).
        let first = try hub.expect("{\"event\":\"listening\"", timeout: 30)
        let second = try hub.expect("{\"event\":\"listening\"", timeout: 30)
        #expect((first + second).contains("\"side\":\"leechers\"") && (first + second).contains("\"side\":\"seeders\""))
    }

    @Test func refusesBadInputClearly() async throws {
        func expectRefusal(_ arguments: [String], status: Int32, saying words: String) async throws {
            let result = try await Self.run(Self.script, arguments)
            #expect(result.status == status, "install.sh \(arguments) exited \(result.status), not \(status)")
            #expect(result.error.contains(words), "install.sh \(arguments) said \(result.error.debugDescription)")
        }
        try await expectRefusal([], status: 64, saying: "no PREFIX given")
        try await expectRefusal(["relative/prefix"], status: 64, saying: "PREFIX must be an absolute path")
        try await expectRefusal(["--frobnicate", "/tmp/x"], status: 64, saying: "unknown option --frobnicate")
        try await expectRefusal(["--hub-auth", "password", "/tmp/x"], status: 64, saying: "--hub-auth takes 'secret' or 'keys'")
        try await expectRefusal(["--from", "/nonexistent-ferry-build", "/tmp/x"], status: 1, saying: "is not a directory")
        try await expectRefusal(["/proc/ferry/usr"], status: 1, saying: "cannot install into /proc/ferry/usr: /proc is not writable")
        try await expectRefusal([Self.script + "/usr"], status: 1, saying: "exists and is not a directory")
        if getuid() == 0 && Self.has("setpriv") {
            // A prefix the user may not write to: root's, as nobody. A copy
            // of the script, which nobody may read wherever the tree is.
            let copy = "/tmp/ferry-install-test-\(getpid()).sh"
            try? FileManager.default.removeItem(atPath: copy)
            try FileManager.default.copyItem(atPath: Self.script, toPath: copy)
            defer { try? FileManager.default.removeItem(atPath: copy) }
            #expect(chmod(copy, 0o755) == 0)
            let result = try await Self.run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups",
                                                                 "/bin/bash", copy, "/usr/ferry-install-test"])
            #expect(result.status == 1)
            #expect(result.error.contains("cannot install into /usr/ferry-install-test: /usr is not writable by nobody (run as root"),
                    "as nobody, install.sh said \(result.error.debugDescription)")
        }
        let help = try await Self.run(Self.script, ["--help"])
        #expect(help.status == 0 && help.output.hasPrefix("usage: Tools/install.sh") && help.output.contains("--from DIR"))
    }

    // MARK: - Helpers

    /// `KEY=VALUE` lines as systemd's EnvironmentFile= reads them (comments,
    /// blank lines, and values in double quotes).
    static func environmentFile(_ path: String) throws -> [String: String] {
        var environment: [String: String] = [:]
        for line in try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n") {
            let text = line.trimmingCharacters(in: .whitespaces)
            guard !text.isEmpty, !text.hasPrefix("#"), let equals = text.firstIndex(of: "=") else { continue }
            var value = String(text[text.index(after: equals)...])
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            environment[String(text[..<equals])] = value
        }
        return environment
    }

    /// The unit's ExecStart= as systemd expands it: `${NAME}` is one word,
    /// `$NAME` is split at whitespace.
    static func execStart(_ unit: String, environment: [String: String]) throws -> [String] {
        guard let line = unit.split(separator: "\n").first(where: { $0.hasPrefix("ExecStart=") }) else {
            throw TestFailure("the unit has no ExecStart=")
        }
        var words: [String] = []
        for word in line.dropFirst("ExecStart=".count).split(separator: " ") {
            if word.hasPrefix("$") && !word.hasPrefix("${") {
                words += (environment[String(word.dropFirst())] ?? "").split(separator: " ").map(String.init)
                continue
            }
            var expanded = String(word)
            for (name, value) in environment { expanded = expanded.replacingOccurrences(of: "${\(name)}", with: value) }
            #expect(!expanded.contains("${"), "ExecStart uses a variable nothing sets: \(expanded)")
            words.append(expanded)
        }
        return words
    }

    struct Result: Sendable {
        var status: Int32
        var output: String
        var error: String
    }

    /// Runs a program to its end on a thread of its own (never on the
    /// cooperative pool), with `environment` added to ours.
    static func run(_ path: String, _ arguments: [String], environment: [String: String] = [:]) async throws -> Result {
        try await withCheckedThrowingContinuation { continuation in
            Thread {
                do {
                    let process = Process()
                    process.executableURL = URL(fileURLWithPath: path)
                    process.arguments = arguments
                    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
                    let output = Pipe()
                    let errorFile = FileManager.default.temporaryDirectory
                        .appendingPathComponent("ferry-install-test-\(UUID().uuidString)")
                    _ = FileManager.default.createFile(atPath: errorFile.path, contents: nil)
                    defer { try? FileManager.default.removeItem(at: errorFile) }
                    let errorHandle = try FileHandle(forWritingTo: errorFile)
                    process.standardOutput = output
                    process.standardError = errorHandle
                    process.standardInput = FileHandle.nullDevice
                    try process.run()
                    let data = output.fileHandleForReading.readDataToEndOfFile()
                    process.waitUntilExit()
                    try errorHandle.close()
                    let error = (try? String(contentsOf: errorFile, encoding: .utf8)) ?? ""
                    continuation.resume(returning: Result(status: process.terminationStatus,
                                                          output: String(decoding: data, as: UTF8.self), error: error))
                } catch {
                    continuation.resume(throwing: error)
                }
            }.start()
        }
    }
}
