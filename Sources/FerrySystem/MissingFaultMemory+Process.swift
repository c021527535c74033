// Post-copy memory owned by another process on this host: the regions are
// mapped inside it and filled from here, so a restored program owns its
// memory while post-copy fills it.
//
// How: freeze the target (Freezer), make one of its threads execute
// userfaultfd(O_CLOEXEC|O_NONBLOCK) and one mmap per region (RemoteSyscall,
// the technique TrackedProcess.attach uses), copy the descriptor to us with
// pidfd_getfd, register the regions, make it close its copy, thaw (registered
// before the thaw: no thread of the target can touch a region while it is
// mapped but not registered, which would read zeros). A userfaultfd acts on the mm of
// the process that created it, so registering, UFFDIO_COPY (from a buffer
// in *our* memory) and the fault messages all work from here while the
// target runs; its threads block on missing pages exactly as ours would.
// Because the target keeps no copy of the descriptor, a FaultGuardian, forked
// before the regions are registered, keeps a second one: should we die
// before post-copy ends, it poisons the missing pages instead of letting the
// kernel drop the registration (and the program read zeros).
// Kernel and capability: as TrackedProcess (ptrace rights over the target,
// pidfd_getfd 5.6+), plus MissingFaultMemory's.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

extension MissingFaultMemory {
    /// Maps `regions` (page aligned, disjoint) as empty private anonymous
    /// memory inside process `pid`, each at its source address when free
    /// there and elsewhere otherwise, and registers them for missing faults
    /// with a userfaultfd created inside it. The target runs on meanwhile
    /// (frozen only for the remote calls); its touches of missing pages block
    /// until installed from here. The mappings stay the target's: `unmap()`
    /// only ends post-copy.
    public static func inProcess(pid: Int32, regions: [AddressRange],
                                 faultTimeout: Duration = .seconds(30)) throws -> MissingFaultMemory {
        try inProcess(pid: pid, areas: regions.map { Area($0) }, faultTimeout: faultTimeout)
    }

    /// `inProcess(pid:regions:)` for areas of any page size: hugetlb areas
    /// are mapped inside the target with MAP_HUGETLB of theirs (from its
    /// hugetlb pool, which is this host's) and filled in whole huge pages.
    public static func inProcess(pid: Int32, areas: [Area],
                                 faultTimeout: Duration = .seconds(30)) throws -> MissingFaultMemory {
        let ptrace = try PtraceThread()
        defer { ptrace.stop() }
        var mappings: [Mapping] = []
        let held: (uffd: Userfaultfd, guardian: FaultGuardian)
        do {
            // Ctrl-C and the like wait until the target's registers are back (DeferredSignals.swift).
            held = try DeferredSignals.during { try ptrace.run { () throws -> (Userfaultfd, FaultGuardian) in
                let frozen = try Freezer.freeze(pid: pid)
                defer { try? Freezer.thaw(frozen) }
                let remote = try RemoteSyscall(frozen: frozen)
                let mmapNumber = Int(ferry_syscall_number_mmap())
                let protection = UInt64(PROT_READ | PROT_WRITE)
                for area in areas where area.range.length > 0 {
                    let region = area.range
                    let flags = UInt64(mapFlags(area))
                    var result = try remote.call(mmapNumber, region.start, region.length, protection,
                                                 flags | UInt64(mapFixedNoReplace), UInt64(bitPattern: -1), 0)
                    if result >= 0 && UInt64(result) != region.start {
                        // A kernel that took the address as a hint: give it back, place anywhere.
                        _ = try remote.call(Int(ferry_syscall_number_munmap()), UInt64(result), region.length)
                        result = -Int(EEXIST)
                    }
                    if result < 0 {
                        result = try remote.call(mmapNumber, 0, region.length, protection, flags, UInt64(bitPattern: -1), 0)
                    }
                    if result < 0 && result > -4096 {
                        throw SystemError(operation: "mmap \(region.length) bytes by remote system call", target: "pid \(pid) for region \(region)",
                                          errno: Int32(-result),
                                          hint: area.isHugetlb ? mapHint(area, Int32(-result))
                                                               : "the target lacks address space or memory for the migrated regions")
                    }
                    mappings.append(Mapping(source: region, local: UInt64(bitPattern: Int64(result)), pageSize: area.pageSize))
                }
                let created = try remote.call(Int(ferry_syscall_number_userfaultfd()), UInt64(O_CLOEXEC | O_NONBLOCK))
                if created < 0 {
                    throw SystemError(operation: "userfaultfd by remote system call", target: "pid \(pid)", errno: Int32(-created),
                                      hint: "needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1")
                }
                let remoteFD = Int32(created)
                defer { _ = try? remote.call(Int(ferry_syscall_number_close()), UInt64(remoteFD)) }
                // Through the borrowed thread when the target's main thread has exited (ThreadGroup.swift).
                let copied: Int32
                switch ThreadGroup.copyDescriptor(remoteFD, of: pid, through: remote.tid) {
                case .success(let local): copied = local
                case .failure(var error):
                    if error.operation == "pidfd_getfd" && error.hint == nil {
                        error.hint = "needs ptrace rights over the target (root or CAP_SYS_PTRACE)"
                    }
                    throw error
                }
                // Still frozen: the regions are registered (and guarded) before
                // any thread of the target can touch them, so none reads zeros.
                let uffd = Userfaultfd(adopting: copied, target: "pid \(pid)")
                let local = mappings.map { AddressRange(start: $0.local, end: $0.local + $0.source.length) }
                // Before anything is registered: never a moment when our death would read zeros.
                let guardian = try FaultGuardian.spawn(holding: uffd, ranges: zip(local, mappings).map { ($0, $1.pageSize) })
                do {
                    _ = try uffd.enable([])
                    for range in local { try uffd.registerMissing(range) }
                } catch {
                    uffd.close()
                    guardian.dismiss()
                    throw error
                }
                return (uffd, guardian)
            } }
        } catch let error as FreezeError {
            throw SystemError(operation: "freezing for the remote system calls", target: "pid \(pid)",
                              errno: { if case .system(let s) = error { return s.errno }; return ESRCH }(),
                              hint: "\(error)")
        } catch let error as RemoteSyscallError {
            throw SystemError(operation: "remote system call", target: "pid \(pid)", errno: ESRCH, hint: "\(error)")
        }
        return try MissingFaultMemory(uffd: held.uffd, mappings: mappings, owner: "pid \(pid)", faultTimeout: faultTimeout,
                                      guardian: held.guardian, unmapper: { _ in })
    }
}
