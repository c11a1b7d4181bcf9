# Builds and runs tests/consumer/project against qmem in one of three ways (MODE: find_package,
# add_subdirectory, fetchcontent). Run by CTest as `cmake -P`; fails (non-zero exit) when any
# step fails, printing that step's output.
foreach(var MODE QMEM_SOURCE_DIR QMEM_BINARY_DIR PROJECT_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

# Runs a command; on failure prints what ran and its output and stops.
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "consumer ${MODE}: ${what} failed (${rc}):\n  ${cmd}\n${out}")
  endif()
  message(STATUS "consumer ${MODE}: ${what}: ok")
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(configure_args -S ${PROJECT_DIR} -B ${WORK_DIR}/build -G ${GENERATOR}
                   -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release
                   -DQMEM_CONSUMER_MODE=${MODE})
if(MODE STREQUAL "find_package")
  run_step("install qmem into ${WORK_DIR}/prefix"
           ${CMAKE_COMMAND} --install ${QMEM_BINARY_DIR} --prefix ${WORK_DIR}/prefix
           --component qmem_development)
  # The installed tree is self-contained: headers and package files, nothing from the source.
  foreach(f include/qmem/qmem.hpp share/cmake/qmem/qmemConfig.cmake
            share/cmake/qmem/qmemConfigVersion.cmake share/cmake/qmem/qmemTargets.cmake)
    if(NOT EXISTS ${WORK_DIR}/prefix/${f})
      message(FATAL_ERROR "consumer find_package: the install has no ${f}")
    endif()
  endforeach()
  list(APPEND configure_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "add_subdirectory" OR MODE STREQUAL "fetchcontent")
  list(APPEND configure_args -DQMEM_SOURCE_DIR=${QMEM_SOURCE_DIR} -DQMEM_ENABLE_CUDA=OFF)
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()

run_step("configure" ${CMAKE_COMMAND} ${configure_args})
run_step("build" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run_step("run" ${WORK_DIR}/build/consumer)
message(STATUS "${step_output}")
if(NOT step_output MATCHES "qmem consumer: ok")
  message(FATAL_ERROR "consumer ${MODE}: the program did not report success:\n${step_output}")
endif()
