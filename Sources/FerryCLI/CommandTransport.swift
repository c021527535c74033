// `exec:COMMAND` addresses: the leecher starts COMMAND (typically
// `ssh source seeder serve --stdio PID`) and speaks to it over its standard
// input and output, so no port has to be opened on the source.
import Foundation
import FerryMigration

public enum CommandTransport {
    /// The command of an `exec:` address, or nil for any other address.
    public static func command(in address: String) -> String? {
        guard address.hasPrefix("exec:") else { return nil }
        let command = String(address.dropFirst(5)).trimmingCharacters(in: .whitespaces)
        return command.isEmpty ? nil : command
    }

    /// Starts `/bin/sh -c command` with pipes on its stdin and stdout; its
    /// stderr stays ours, so its messages reach the user.
    public static func spawn(_ command: String) throws -> FrameTransport {
        var toChild: [Int32] = [0, 0]
        var fromChild: [Int32] = [0, 0]
        do {
            try checkedCall("pipe", on: "the standard input of '\(command)'") { pipe(&toChild) }
            do {
                try checkedCall("pipe", on: "the standard output of '\(command)'") { pipe(&fromChild) }
            } catch {
                close(toChild[0])
                close(toChild[1])
                throw error
            }
        } catch {
            throw MigrationError.badArgument("cannot start '\(command)': no pipes (\(error))")
        }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
        let words: [String] = ["/bin/sh", "-c", command]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, "/bin/sh", &actions, nil, argv, environ)
        close(toChild[0])
        close(fromChild[1])
        guard rc == 0 else {
            close(toChild[1])
            close(fromChild[0])
            throw MigrationError.badArgument("cannot start '\(command)': \(SystemError(operation: "posix_spawn", target: "/bin/sh", errno: rc))")
        }
        // Reap it when it ends, so it leaves no zombie behind. Without a
        // thread for that, it stays a zombie until we exit: no reason to fail.
        let spawned = child
        if let reaper = try? startThread(for: "the reaper of '\(command)'", {
            var status: Int32 = 0
            _ = try? checkedCall("waitpid", on: "pid \(spawned)") { waitpid(spawned, &status, 0) }
        }) {
            pthread_detach(reaper)
        }
        return Transports.descriptors(input: fromChild[0], output: toChild[1], peerDescription: "exec:\(command)")
    }
}
